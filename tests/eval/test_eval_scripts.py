"""End to end: the evaluation scripts as a user runs them, crashes included."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pytest
from ctrl_c import WITH_DEFAULT_CTRL_C
from gcs_emulator import gcs_filesystem
from hf_models import make_tiny_hf_model

from gsm8k_jax import storage
from gsm8k_jax.eval.extraction import is_correct
from gsm8k_jax.eval.run_record import run_tag_of
from gsm8k_jax.models.specs import TINY_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]
BASE_SCRIPT = REPO / "research" / "script" / "eval_gsm8k_base.py"
LORA_SCRIPT = REPO / "research" / "script" / "eval_gsm8k.py"
QUICK = ["--num_examples=6", "--batch_size=4", "--max_generation_steps=12"]
TIMING_KEYS = {
    "started_at",
    "finished_at",
    "compile_s",
    "phase_seconds",
    "wall_time_s",
    "tokens_per_s",
    "resumed_examples",
    "compilation_cache",
}
ROLLOUT_KEYS = {
    "id",
    "sample_index",
    "question",
    "gold",
    "reference_solution",
    "prompt",
    "response",
    "extracted_answer",
    "correct",
    "extracted_answers",
    "correct_by_method",
    "num_tokens",
    "finish_reason",
    "logprob",
}


# What the default output must not show: absl INFO lines (e.g. JAX's "Unable
# to initialize backend 'tpu'"), transformers' import advice, tracebacks.
NOISE = re.compile(r"^I\d{4} |PyTorch was not found|Traceback", re.MULTILINE)


def run_script(*args, script=BASE_SCRIPT, check=True, cwd=REPO, **kwargs):
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_outputs(out_dir: Path, tag: str):
    rollouts = (out_dir / f"rollouts_{tag}.jsonl").read_text()
    summary = json.loads((out_dir / f"summary_{tag}.json").read_text())
    return rollouts, summary


def test_tiny_model_run_writes_rollouts_and_summary(tmp_path):
    proc = run_script(*QUICK, f"--output_dir={tmp_path}")
    tag = "gemma3-tiny_base_bs4"
    assert f"Run tag: {tag}" in proc.stdout
    assert not NOISE.search(proc.stdout + proc.stderr), proc.stderr
    rollouts, summary = read_outputs(tmp_path, tag)
    lines = [json.loads(line) for line in rollouts.splitlines()]
    assert [r["id"] for r in lines] == list(range(6))
    assert all(set(r) == ROLLOUT_KEYS for r in lines)
    first = lines[0]
    assert first["gold"] == "18" and first["question"].startswith("Janet")
    assert first["prompt"].startswith("<bos><start_of_turn>user\nJanet")
    assert first["prompt"].endswith("<end_of_turn>\n<start_of_turn>model\n")
    assert "\\boxed{}" in first["prompt"]
    assert all(
        r["num_tokens"] <= 12 and r["finish_reason"] in ("eos", "length") for r in lines
    )
    assert summary["total"] == 6 and summary["correct"] == sum(
        r["correct"] for r in lines
    )
    low, high = summary["accuracy_ci95"]
    assert low <= summary["accuracy"] <= high
    assert summary["truncations"] == sum(r["finish_reason"] == "length" for r in lines)
    assert summary["run"]["eval"]["sampling"]["eos_ids"] == [1, 106]
    assert summary["versions"]["jax"] and summary["tokens_per_s"] > 0
    # lm-eval's habits: the full reference, both filters, when and from what.
    assert first["reference_solution"].endswith("#### 18")
    assert first["reference_solution"].startswith("Janet sells 16 - 3 - 4")
    for method in ("strict", "flexible"):
        assert [r["correct_by_method"][method] for r in lines] == [
            is_correct(r["response"], r["gold"], method) for r in lines
        ]
        assert summary["by_method"][method]["correct"] == sum(
            r["correct_by_method"][method] for r in lines
        )
    assert summary["extraction_method"] == "strict"
    assert summary["started_at"] <= summary["finished_at"]
    assert summary["compile_s"] > 0 and summary["wall_time_s"] > summary["compile_s"]
    phases = summary["phase_seconds"]
    assert set(phases) == {"compile", "prefill", "decode", "host"}
    assert min(phases.values()) > 0
    assert sum(phases.values()) <= summary["wall_time_s"]
    assert summary["run"]["model_revision"].startswith("sha256:")
    assert re.fullmatch(
        r"[0-9a-f]{40}(-dirty)?", summary["versions"]["gsm8k_jax_commit"]
    )

    # Another extraction re-scores the same responses: nothing is generated.
    proc = run_script(
        *QUICK, "--extraction_method=flexible", f"--output_dir={tmp_path}"
    )
    assert "Compiling" not in proc.stderr
    rescored, summary = read_outputs(tmp_path, tag)
    rescored = [json.loads(line) for line in rescored.splitlines()]
    assert [r["response"] for r in rescored] == [r["response"] for r in lines]
    assert [r["correct"] for r in rescored] == [
        r["correct_by_method"]["flexible"] for r in lines
    ]
    assert summary["extraction_method"] == "flexible"
    assert summary["resumed_examples"] == 6 and summary["generated_tokens"] == sum(
        r["num_tokens"] for r in lines
    )


def test_hf_folder_model_path(tmp_path):
    """A local Hugging Face folder (weights made by transformers) as --model.model_path."""
    model_dir = tmp_path / "hf"
    make_tiny_hf_model(model_dir, vocab_size=4096)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY_MODEL_DIR / name, model_dir / name)
    proc = run_script(
        *QUICK,
        "--model.model_name=gemma3-1b-it",
        f"--model.model_path={model_dir}",
        "--model.dtype=float32",
        f"--output_dir={tmp_path / 'out'}",
    )
    rollouts, summary = read_outputs(tmp_path / "out", "gemma3-1b-it_base_bs4")
    assert summary["run"]["model_dir"] == str(model_dir)
    assert len(rollouts.splitlines()) == 6
    # The random weights are not gemma3-1b's shape: the label is questioned.
    assert re.search(
        r"warning: .*/hf holds a 3-layer model of width 64, not gemma3-1b-it's"
        r" 26 layers of width 1152",
        proc.stderr,
    ), proc.stderr
    assert (
        "warning" not in run_script(*QUICK, f"--output_dir={tmp_path / 'own'}").stderr
    )


def committed(out_dir, tag) -> int:
    """The rollout lines a run has committed so far, in its chunks and its
    rollouts file (local or gs://), read with fsspec directly."""
    fs, root = fsspec.core.url_to_fs(str(out_dir))
    fs.invalidate_cache()
    paths = [f"{root}/rollouts_{tag}.jsonl"]
    if fs.exists(f"{root}/chunks_{tag}"):
        paths += fs.find(f"{root}/chunks_{tag}")
    return sum(
        fs.cat_file(p).count(b"\n")
        for p in paths
        if p.endswith(".jsonl") and fs.exists(p)
    )


# How long the child runs between two checks of what it has committed.
RUN_SLICE_S = 0.02


def interrupt_after(command, out_dir, tag, lines, *, sig, timeout_s=300):
    """Runs `command` and sends it `sig` once run `tag` in `out_dir` has
    committed `lines` rollouts; returns the finished process, its output as
    text.

    The child runs in slices of RUN_SLICE_S and is stopped (SIGSTOP) while
    its files are read, so it can never get further than one slice past the
    check that triggers `sig`, however slow the check or loaded the machine.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [*WITH_DEFAULT_CTRL_C, *command], cwd=REPO, stdout=out, stderr=err
        )
        start = time.time()
        seen = []  # (seconds since start, rollouts committed), as polled
        while time.time() < start + timeout_s and proc.poll() is None:
            time.sleep(RUN_SLICE_S)
            proc.send_signal(signal.SIGSTOP)
            seen.append((round(time.time() - start, 2), committed(out_dir, tag)))
            if seen[-1][1] >= lines:
                break
            proc.send_signal(signal.SIGCONT)
        running = proc.poll() is None
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)  # `sig` is handled on resuming.
        proc.wait()
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(
            command, proc.returncode, out.read(), err.read()
        )
        # What a failed check of the interruption reports: the polls, and
        # where an interruption could have been lost (an exception raised in
        # a finalizer is printed as "Exception ignored" and dropped).
        lost = [
            line
            for line in done.stderr.splitlines()
            if "Exception ignored" in line or "KeyboardInterrupt" in line
        ]
        done.polls = (
            f"{len(seen)} polls, the last {seen[-3:]}; still running when"
            f" signalled: {running}; exit {proc.returncode}; stderr lines about"
            f" lost exceptions {lost[:5]!r}; stderr ends {done.stderr[-400:]!r}"
        )
        return done


def kill_after(command, out_dir, tag, lines, *, timeout_s=300):
    """Runs `command` and kill -9s it once run `tag` has committed `lines`
    rollouts; returns how many it has committed then."""
    interrupt_after(
        command, out_dir, tag, lines, sig=signal.SIGKILL, timeout_s=timeout_s
    )
    return committed(out_dir, tag)


# Sequences mostly finish together, 32 rows (one CPU row tile) at a time, so
# 320 problems are committed in about ten chunks: two interruptions land
# mid-run, each at most one run slice after its check (see interrupt_after).
NUM_STOP_EXAMPLES = 320
STOP_ARGS = [
    f"--num_examples={NUM_STOP_EXAMPLES}",
    "--batch_size=2",
    "--max_generation_steps=32",
]
STOP_TAG = "gemma3-tiny_base_bs2"
RESUME_LINE = "finished results are kept; rerun the same command to resume.\n"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The files of an uninterrupted local run with STOP_ARGS."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_script(*STOP_ARGS, f"--output_dir={out}")
    return read_outputs(out, STOP_TAG)


def stop_after(out_dir, lines, sig):
    """Runs STOP_ARGS into `out_dir`, sends `sig` once `lines` rollouts are
    committed; returns the process and how many are committed then."""
    command = [sys.executable, str(BASE_SCRIPT), *STOP_ARGS, f"--output_dir={out_dir}"]
    stopped = interrupt_after(command, out_dir, STOP_TAG, lines, sig=sig)
    finished = committed(out_dir, STOP_TAG)
    assert lines <= finished < NUM_STOP_EXAMPLES, (
        f"the interruption must land mid-run: {stopped.polls}"
    )
    assert "Traceback" not in stopped.stderr
    return stopped, finished


def assert_stopped_cleanly(proc, status, message):
    """Exit status `status`, and `message` once, as stderr's last line: the
    progress bar is closed before it, not drawn again after it."""
    assert proc.returncode == status, proc.stderr[-3000:]
    assert proc.stderr.endswith("\n" + message) and proc.stderr.count(message) == 1


def assert_uninterrupted_files(rollouts, summary, uninterrupted, resumed):
    expected_rollouts, expected_summary = uninterrupted
    assert rollouts == expected_rollouts  # Byte for byte.
    assert summary["resumed_examples"] == resumed
    assert {k: v for k, v in summary.items() if k not in TIMING_KEYS} == {
        k: v for k, v in expected_summary.items() if k not in TIMING_KEYS
    }


def test_ctrl_c_and_sigterm_then_resume_give_the_uninterrupted_files(
    tmp_path, uninterrupted
):
    """Ctrl-C (exit 130) and SIGTERM (exit 0) each say how to resume, in one
    line; resuming past a damaged chunk and a writer's leftover temporary
    file gives the uninterrupted files, and removes the chunks."""
    out = tmp_path / "stopped"
    stopped, finished = stop_after(out, 4, signal.SIGINT)
    assert_stopped_cleanly(stopped, 130, f"Interrupted: {RESUME_LINE}")
    chunks = out / f"chunks_{STOP_TAG}"
    # A torn chunk (never written by an atomic commit, but a damaged store
    # could hold one) whose first, complete line is a wrong answer to a
    # problem not yet finished: the whole chunk must be ignored.
    done = {
        json.loads(x)["id"]
        for c in chunks.iterdir()
        for x in c.read_text().splitlines()
    }
    todo = min(set(range(NUM_STOP_EXAMPLES)) - done)
    fake = json.loads(uninterrupted[0].splitlines()[todo]) | {"response": "FAKE"}
    (chunks / "0000-00009999.jsonl").write_text(json.dumps(fake) + '\n{"id": 4')
    (chunks / ".0000-00000099.jsonl.0123456789ab.tmp").write_text('{"id": 46')

    stopped, later = stop_after(out, finished + 1 + 4, signal.SIGTERM)
    later -= 1  # The torn chunk's complete line.
    assert_stopped_cleanly(stopped, 0, f"Stopped by SIGTERM: {RESUME_LINE}")

    resumed = run_script(*STOP_ARGS, f"--output_dir={out}")
    assert re.search(
        rf"Resuming {STOP_TAG}: {later} of {NUM_STOP_EXAMPLES} problems are already"
        " finished",
        resumed.stderr,
    ), resumed.stderr
    assert_uninterrupted_files(*read_outputs(out, STOP_TAG), uninterrupted, later)
    assert sorted(p.name for p in out.iterdir()) == [
        f"{name}_{STOP_TAG}.{ext}"
        for name, ext in (("rollouts", "jsonl"), ("run", "json"), ("summary", "json"))
    ]


def test_gcs_output_survives_sigterm_and_kill_9(gcs_bucket, uninterrupted):
    """--output_dir=gs://: SIGTERM, then kill -9 of the resumed run, then a
    rerun give the uninterrupted local run's rollouts, byte for byte."""
    out = f"{gcs_bucket}/stopped-run"
    stopped, finished = stop_after(out, 4, signal.SIGTERM)
    assert_stopped_cleanly(stopped, 0, f"Stopped by SIGTERM: {RESUME_LINE}")
    _, later = stop_after(out, finished + 8, signal.SIGKILL)
    run_script(*STOP_ARGS, f"--output_dir={out}")
    fs = gcs_filesystem()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(out, detail=False))
    assert names == [
        f"{n}_{STOP_TAG}.{e}"
        for n, e in (("rollouts", "jsonl"), ("run", "json"), ("summary", "json"))
    ]
    rollouts = fs.cat_file(f"{out}/rollouts_{STOP_TAG}.jsonl").decode()
    summary = json.loads(fs.cat_file(f"{out}/summary_{STOP_TAG}.json"))
    assert_uninterrupted_files(rollouts, summary, uninterrupted, later)
    assert not (REPO / "gs:").exists()  # pathlib's gs:/ folder of old


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    run_script(*QUICK, f"--output_dir={out}")
    return out, (out / "rollouts_gemma3-tiny_base_bs4.jsonl").read_text()


def test_a_finished_run_rerun_says_so_and_keeps_its_rollouts(finished_run):
    out, rollouts = finished_run
    proc = run_script(*QUICK, f"--output_dir={out}")
    assert "gemma3-tiny_base_bs4: all 6 problems were already finished" in proc.stderr
    assert "Resuming" not in proc.stderr and "Compiling" not in proc.stderr
    assert (out / "rollouts_gemma3-tiny_base_bs4.jsonl").read_text() == rollouts


def test_a_rerun_on_more_problems_extends_the_run(finished_run, tmp_path):
    """A rerun on more problems keeps the finished ones (a problem's results
    do not depend on which others run) and gives the files of a run on all
    of them; one on fewer is refused (below)."""
    more = [*QUICK, "--num_examples=9"]
    fresh = tmp_path / "fresh"
    run_script(*more, f"--output_dir={fresh}")
    out = tmp_path / "copy"
    shutil.copytree(finished_run[0], out)
    proc = run_script(*more, f"--output_dir={out}")
    assert "Resuming gemma3-tiny_base_bs4: 6 of 9 problems" in proc.stderr
    rollouts, summary = read_outputs(out, "gemma3-tiny_base_bs4")
    assert_uninterrupted_files(
        rollouts, summary, read_outputs(fresh, "gemma3-tiny_base_bs4"), resumed=6
    )


def test_overwrite_says_what_it_removes(finished_run, tmp_path):
    out, rollouts = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    proc = run_script(*QUICK, "--overwrite", f"--output_dir={copy}")
    assert (
        f"--overwrite: removing the results of run 'gemma3-tiny_base_bs4' in {copy}"
        " and evaluating it again."
    ) in proc.stderr
    assert "already finished" not in proc.stderr
    assert (copy / "rollouts_gemma3-tiny_base_bs4.jsonl").read_text() == rollouts


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.bogus=1"], "unknown --model field"),
        (["--model.lora_config.rank=abc"], "invalid literal"),
        (["--batchsize=3"], "Unknown command line flag 'batchsize'"),
        (["--model.model_name=gemma9"], "--model.model_name='gemma9'"),
        (
            ["--model.dtype=float8"],
            "Unknown dtype 'float8'; use bfloat16, float32 or float16.",
        ),
        (["--data_path=/nonexistent/test.jsonl"], "--data_path"),
        (["--model.lora_checkpoint_path=/tmp/x"], "use eval_gsm8k.py"),
        (
            ["--max_generation_steps=13"],
            "other settings \\(differing: eval.sampling.max_generation_steps\\)",
        ),
        (
            ["--max_generation_steps=8192"],
            "leaves no room for a prompt in the model's context of 8192 tokens",
        ),
        (["--noresume"], "--resume to continue them or --overwrite"),
        # Fewer problems would leave finished ones out (more extend the run).
        (["--num_examples=4"], "on its first 6 problems; 4 would leave some out"),
        (["--extraction_method=fuzzy"], "extraction_method"),
        (["results/elsewhere"], "unexpected argument\\(s\\) results/elsewhere"),
        (["--row_tile=4"], "other settings \\(differing: row_tile\\)"),
        (["--row_tile=0"], "row_tile"),
        (["--num_samples=3"], "gives 3 identical samples: set a temperature > 0"),
        (["--prompt_template=Solve this."], "--prompt_template\\) must contain"),
        # No cluster for JAX to detect, and no coordinator given.
        (["--distributed"], "error: --distributed: .* Pass --coordinator_address="),
    ],
)
def test_bad_input_fails_early_and_clearly_without_damage(finished_run, args, message):
    out, rollouts = finished_run
    settings = {a.split("=")[0]: a for a in QUICK}
    settings.update({a.split("=")[0]: a for a in args})
    proc = run_script(*settings.values(), f"--output_dir={out}", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert (out / "rollouts_gemma3-tiny_base_bs4.jsonl").read_text() == rollouts


FINISHED_TAG = "gemma3-tiny_base_bs4"


def finished_copy(finished_run, target):
    """A copy of the finished run's folder, and the path of its rollouts."""
    shutil.copytree(finished_run[0], target)
    return target, target / f"rollouts_{FINISHED_TAG}.jsonl"


def test_a_damaged_rollouts_line_is_generated_again_alone(finished_run, tmp_path):
    """A line of a finished run's rollouts made unreadable: rerunning the
    same command warns in one line naming it, generates its problem alone
    and gives back the whole file, byte for byte."""
    out, rollouts = finished_copy(finished_run, tmp_path / "copy")
    lines = rollouts.read_text().splitlines(keepends=True)
    lines[2] = "garbage\n"
    rollouts.write_text("".join(lines))
    proc = run_script(*QUICK, f"--output_dir={out}")
    (warning,) = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warning == (
        f"warning: {rollouts}, line 3 is damaged (not valid JSON at column 1:"
        " Expecting value) and left out: its problem counts as unfinished, and"
        " resuming the run generates it again and keeps every other line."
    )
    assert f"Resuming {FINISHED_TAG}: 5 of 6 problems are already finished" in (
        proc.stderr
    )
    assert rollouts.read_text() == finished_run[1]
    assert read_outputs(out, FINISHED_TAG)[1]["resumed_examples"] == 5


def test_rows_of_problems_not_in_the_run_are_not_resumed(finished_run, tmp_path):
    """A stopped run's folder holding a chunk of another run (of problems
    past this run's 6): those rows count as none of its problems."""
    out = tmp_path / "stopped"
    chunks = out / f"chunks_{FINISHED_TAG}"
    chunks.mkdir(parents=True)
    record = f"run_{FINISHED_TAG}.json"
    shutil.copy(finished_run[0] / record, out / record)
    lines = finished_run[1].splitlines(keepends=True)
    (chunks / "0000-00000000.jsonl").write_text("".join(lines[:3]))
    others = [json.loads(line) | {"id": 6 + i} for i, line in enumerate(lines[:3])]
    (chunks / "0001-00000000.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in others)
    )
    proc = run_script(*QUICK, f"--output_dir={out}")
    assert (
        f"warning: {out} holds rollouts of 3 problem(s) that are not among the 6 of"
        f" run '{FINISHED_TAG}' (ids 6, 7, 8; from another run?): they are left out"
        " of its results."
    ) in proc.stderr.splitlines()
    assert f"Resuming {FINISHED_TAG}: 3 of 6 problems are already finished" in (
        proc.stderr
    )
    rollouts, summary = read_outputs(out, FINISHED_TAG)
    assert rollouts == finished_run[1]
    assert summary["resumed_examples"] == 3 and summary["total"] == 6


def test_a_lost_run_record_is_named_or_taken_from_the_summary(finished_run, tmp_path):
    """Without run_<tag>.json a finished run resumes from the copy its
    summary holds (and the record is written again); a stopped run, which
    has no summary yet, is refused in one line naming the file, not as
    differing in every setting. A damaged summary is written again."""
    record = f"run_{FINISHED_TAG}.json"
    out, rollouts = finished_copy(finished_run, tmp_path / "finished")
    (out / record).unlink()
    proc = run_script(*QUICK, f"--output_dir={out}")
    assert f"{FINISHED_TAG}: all 6 problems were already finished" in proc.stderr
    assert rollouts.read_text() == finished_run[1]
    assert (out / record).read_text() == (finished_run[0] / record).read_text()
    # A damaged summary is written again the same way (as the comparison's
    # warning advises), generating nothing.
    summary = out / f"summary_{FINISHED_TAG}.json"
    summary.write_text(summary.read_text()[:100])
    proc = run_script(*QUICK, f"--output_dir={out}")
    assert "Compiling" not in proc.stderr
    _, expected = read_outputs(finished_run[0], FINISHED_TAG)
    assert {
        k: v for k, v in json.loads(summary.read_text()).items() if k not in TIMING_KEYS
    } == {k: v for k, v in expected.items() if k not in TIMING_KEYS}

    stopped = tmp_path / "stopped"
    (stopped / f"chunks_{FINISHED_TAG}").mkdir(parents=True)
    (stopped / f"chunks_{FINISHED_TAG}" / "0000-00000000.jsonl").write_text(
        "".join(finished_run[1].splitlines(keepends=True)[:3])
    )
    proc = run_script(*QUICK, f"--output_dir={stopped}", check=False)
    assert proc.returncode == 1 and "differing" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"error: {stopped} holds results of run '{FINISHED_TAG}' but not its run"
        f" record {record}, which says what settings produced them, so they cannot"
        " be resumed: restore it, or use another --output_dir (--overwrite deletes"
        " the results)."
    )


def test_a_home_folder_after_equals_is_expanded(tmp_path):
    """The shell leaves `~` after `=` as it is: `--output_dir=~/runs` must
    not write into a folder named `~` in the working directory."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home))
    run_script(*QUICK, "--output_dir=~/runs", cwd=tmp_path, env=env)
    assert (home / "runs" / "summary_gemma3-tiny_base_bs4.json").is_file()
    assert not (tmp_path / "~").exists()


def test_credentials_are_never_written(tmp_path):
    """Tokens and credential paths in the environment appear in no output,
    file or log (the run records versions, devices and settings)."""
    secrets = {
        "HF_TOKEN": "hf_SECRETtoken123",
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "SECRETcreds.json"),
    }
    proc = run_script(
        *QUICK, f"--output_dir={tmp_path / 'out'}", env=dict(os.environ, **secrets)
    )
    written = [p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(written) == 3
    for text in (proc.stdout, proc.stderr, *written):
        assert "SECRET" not in text


def test_a_rerun_reads_every_program_the_first_run_compiled(tmp_path):
    """The persistent compilation cache: a rerun of the same settings reads
    what the first run wrote and compiles nothing worth caching again; ''
    turns the cache off."""
    # Every program is worth caching: which compile in over 0.5 s (the
    # default threshold) depends on the machine.
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    counts = []
    for run, cache in enumerate([tmp_path / "cache", tmp_path / "cache", ""]):
        out = tmp_path / f"out{run}"
        run_script(
            *QUICK, f"--compilation_cache_dir={cache}", f"--output_dir={out}", env=env
        )
        _, summary = read_outputs(out, "gemma3-tiny_base_bs4")
        counts.append(summary["compilation_cache"])
    first, rerun, off = counts
    assert first["written"] > 0 and first["read"] == 0
    assert rerun == {"read": first["written"], "written": 0}
    assert off == {"read": 0, "written": 0}


def test_greedy_resumes_whatever_its_unused_sampling_flags(finished_run, tmp_path):
    """Greedy decoding reads no seed, top_k or top_p: a rerun that names them
    (or drops them) resumes instead of being refused as other settings; a
    base run reads no LoRA, so neither is it refused for LoRA flags. A
    sampled run gets files of its own."""
    out = tmp_path / "copy"
    shutil.copytree(finished_run[0], out)
    run_script(
        *QUICK,
        "--seed=5",
        "--top_k=3",
        "--top_p=0.5",
        "--model.lora_config.rank=8",
        f"--output_dir={out}",
    )
    assert (out / "rollouts_gemma3-tiny_base_bs4.jsonl").read_text() == finished_run[1]
    # The records name no seed, top_k or top_p that the run never read.
    record = json.loads((out / "run_gemma3-tiny_base_bs4.json").read_text())
    _, summary = read_outputs(out, "gemma3-tiny_base_bs4")
    for sampling in (record["eval"]["sampling"], summary["run"]["eval"]["sampling"]):
        assert [sampling[k] for k in ("seed", "top_k", "top_p")] == [None] * 3
    # A sampled run is a run of its own, named by its sampling settings.
    sampled = run_script(
        *QUICK,
        "--temperature=0.5",
        "--seed=3",
        "--num_samples=2",
        f"--output_dir={out}",
    )
    tag = "gemma3-tiny_base_t0.5_n2_seed3_bs4"
    assert f"Run tag: {tag}" in sampled.stdout
    record = json.loads((out / f"run_{tag}.json").read_text())
    assert run_tag_of(record) == tag
    # Its last line gives pass@2 and maj@2, and says how the interval is made.
    _, summary = read_outputs(out, tag)
    last = sampled.stdout.splitlines()[-1]
    assert f"pass@2 {summary['pass@2']:.2%}, maj@2 {summary['maj@2']:.2%}" in last
    assert "clustered by problem" in last
    assert (out / "rollouts_gemma3-tiny_base_bs4.jsonl").read_text() == finished_run[1]


def test_row_tile_and_mesh_model_are_recorded(finished_run, tmp_path):
    """--row_tile is the run's (the default is the platform's, 32 on CPU);
    resuming under another tile is refused (above). So is --mesh_model
    (tests/eval/test_run_files.py)."""
    run_script(*QUICK, "--row_tile=4", f"--output_dir={tmp_path}")
    _, summary = read_outputs(tmp_path, "gemma3-tiny_base_bs4")
    assert summary["run"]["row_tile"] == 4 and summary["total"] == 6
    default_out, _ = finished_run
    _, default_summary = read_outputs(default_out, "gemma3-tiny_base_bs4")
    assert default_summary["run"]["row_tile"] == 32
    assert default_summary["run"]["mesh_model"] == summary["run"]["mesh_model"] == 1


def test_malformed_data_line_is_named(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n{"question": oops}\n')
    proc = run_script(
        f"--data_path={data}", f"--output_dir={tmp_path / 'out'}", check=False
    )
    assert (
        proc.returncode == 1 and "line 2" in proc.stderr and "bad.jsonl" in proc.stderr
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "q", "answer": "so it is four"}\n', "line 1: the answer must"),
        ("\n\n", "holds no GSM8K problems"),
    ],
)
def test_unscorable_data_is_refused(tmp_path, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    proc = run_script(
        f"--data_path={data}", f"--output_dir={tmp_path / 'out'}", check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr and "data.jsonl" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_more_examples_than_the_data_and_slots_than_the_work_are_capped(tmp_path):
    """Examples past the data's end with a note; slots past the problems
    silently (100,000 slots would not fit in memory), and the run keeps the
    batch size asked for in its tag. Also: sampling settings that greedy
    decoding ignores are named."""
    data = tmp_path / "six.jsonl"
    lines = (REPO / "gsm8k_jax" / "data" / "test.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines[:6]) + "\n")
    proc = run_script(
        f"--data_path={data}",
        "--num_examples=5000",
        "--batch_size=100000",
        "--max_generation_steps=4",
        "--top_p=0.9",
        f"--output_dir={tmp_path}",
    )
    assert "Asked for 5000 examples" in proc.stderr and "has 6" in proc.stderr
    assert "note: --top_p=0.9 has no effect at --temperature=0" in proc.stderr
    _, summary = read_outputs(tmp_path, "gemma3-tiny_base_bs100000")
    assert summary["total"] == 6


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_second_copy_of_a_running_command_is_refused(request, tmp_path, where):
    """A job launched twice: the copy stops in one line naming the running
    process, before it loads anything, and the first run finishes as it
    would alone, leaving no lock (on gs://, no lease) behind."""
    if where == "gcs":
        out = f"{request.getfixturevalue('gcs_bucket')}/second-copy"
    else:
        out = str(tmp_path / "out")
    lock = f"{out}/.lock_gemma3-tiny_base_bs4_p0"
    first = subprocess.Popen(
        [sys.executable, str(BASE_SCRIPT), *QUICK, f"--output_dir={out}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    holder = f"{first.pid} on {socket.gethostname()}"

    def locked_by_first() -> bool:
        """The pid is written once the lock is taken (locally: its text;
        on gs://: the lease's record)."""
        try:
            text = storage.read_text(lock)
        except FileNotFoundError:
            return False
        if where == "local":
            return text == f"{holder}\n"
        return json.loads(text)["pid"] == first.pid

    try:
        deadline = time.time() + 120
        while first.poll() is None and time.time() < deadline:
            if locked_by_first():
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # Holding its lock, mid-run.
        assert locked_by_first()
        second = run_script(*QUICK, f"--output_dir={out}", check=False)
        assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(
            f"error: Run 'gemma3-tiny_base_bs4' is already running in {out}"
            f" (process {holder}"
        ), second.stderr
        assert "wait for it to finish" in second.stderr
        overwrite = run_script(
            *QUICK, "--overwrite", f"--output_dir={out}", check=False
        )
        assert "is already running" in overwrite.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    summary = json.loads(storage.read_text(f"{out}/summary_gemma3-tiny_base_bs4.json"))
    assert summary["total"] == 6 and summary["resumed_examples"] == 0
    assert not [n for n in storage.list_names(out) if n.startswith(".lock_")]
    run_script(*QUICK, f"--output_dir={out}")  # Free again: it resumes.


def test_a_failed_start_does_not_block_its_corrected_rerun(tmp_path):
    """A start that fails after the model loaded leaves no run record; a
    record without results (an older failure) does not block either."""
    failed = run_script(
        *QUICK, "--eos_tokens=999999", f"--output_dir={tmp_path}", check=False
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert re.search(r"outside the model's vocabulary .* \[1, 106\]", failed.stderr)
    assert not list(tmp_path.glob("run_*.json"))
    (tmp_path / "run_gemma3-tiny_base_bs4.json").write_text('{"other": 1}\n')
    run_script(*QUICK, f"--output_dir={tmp_path}")
    _, summary = read_outputs(tmp_path, "gemma3-tiny_base_bs4")
    assert summary["total"] == 6


@pytest.mark.parametrize(
    "output_dir, message",
    [
        (
            "s3://bucket/run",
            (
                "error: Cannot use s3://bucket/run: s3:// storage is not supported;"
                " use a local folder or gs://bucket/folder."
            ),
        ),
        (
            "{file}/out",
            "error: Cannot write to output folder {file}/out: {file} is a file",
        ),
        (
            "gs://no-such-bucket-xyz/run",
            (
                "error: Cannot write to output folder gs://no-such-bucket-xyz/run:"
                " bucket gs://no-such-bucket-xyz does not exist."
            ),
        ),
    ],
)
def test_bad_output_dir_is_one_line_before_any_work(
    tmp_path, gcs_bucket, output_dir, message
):
    """Refused before the data and the model are read (both are missing
    here, and not named), writing nothing, also in the working folder."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_script(
        "--data_path=/nonexistent/test.jsonl",
        "--model.model_path=/nonexistent/model",
        f"--output_dir={output_dir.format(file=blocker)}",
        check=False,
        cwd=cwd,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(message.format(file=blocker)), proc.stderr
    assert not any(cwd.iterdir()) and sorted(tmp_path.iterdir()) == [cwd, blocker]


def test_a_file_as_compilation_cache_is_one_line_before_any_work(tmp_path):
    """It was half ignored: JAX warned on every program and cached nothing."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_script(
        "--data_path=/nonexistent/test.jsonl",
        f"--compilation_cache_dir={blocker}",
        f"--output_dir={tmp_path / 'out'}",
        check=False,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        f"error: Cannot write to compilation cache folder {blocker}: {blocker} is a"
        " file, not a folder. Choose another --compilation_cache_dir (or '' for"
        " none)."
    ), proc.stderr


# A folder that takes no new entries, whoever asks (root passes os.access):
# mkdir under /proc fails with an OS error of its own.
UNCREATABLE = "/proc/gsm8k_jax_no_such_folder"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")
@pytest.mark.parametrize(
    "flag, role",
    [
        ("--output_dir", "output folder"),
        ("--compilation_cache_dir", "compilation cache folder"),
    ],
)
def test_an_uncreatable_folder_is_one_line_before_any_work(tmp_path, flag, role):
    """Under /proc: the output folder failed after the run had started, in
    the OS's words alone; the compilation cache warned in several lines on
    every program and cached nothing."""
    folder = f"{UNCREATABLE}/run"
    settings = {
        "--output_dir": tmp_path / "out",
        "--compilation_cache_dir": tmp_path / "cache",
        flag: folder,
    }
    proc = run_script(
        "--data_path=/nonexistent/test.jsonl",
        *(f"{name}={value}" for name, value in settings.items()),
        check=False,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    # As root (os.access passes): making a folder there fails; else: denied.
    reason = r"(cannot create a folder in /proc \(.+\)|/proc is not writable)\."
    assert re.match(f"error: Cannot write to {role} {folder}: {reason}", proc.stderr)
    assert proc.stderr.rstrip().endswith(
        f" Choose another {flag}"
        + (" (or '' for none)." if flag == "--compilation_cache_dir" else ".")
    ), proc.stderr
    assert not any(tmp_path.iterdir())


def test_lora_script_requires_a_checkpoint(tmp_path):
    proc = run_script(
        *QUICK, f"--output_dir={tmp_path}", script=LORA_SCRIPT, check=False
    )
    assert proc.returncode == 1 and "--model.lora_checkpoint_path" in proc.stderr
