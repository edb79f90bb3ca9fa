"""eval_gsm8k.py end to end with a Tunix LoRA checkpoint, local and on gs://."""

import dataclasses
import functools
import json
import operator
import re
from pathlib import Path

import jax
import pytest
import transformers
from eval.test_eval_scripts import LORA_SCRIPT, QUICK, run_script
from flax import nnx
from gcs_emulator import upload_dir
from jax.sharding import NamedSharding
from lora_checkpoints import random_factors, write_tunix_checkpoint

from gsm8k_jax.checkpoints.lora import detach_lora, load_lora, lora_mode
from gsm8k_jax.checkpoints.lora_checkpoint import (
    TRAINING_SETTINGS_FILE,
    resolve_trained_lora,
    save_lora_config,
)
from gsm8k_jax.checkpoints.lora_config import LoraConfig
from gsm8k_jax.checkpoints.sources import model_revision
from gsm8k_jax.eval.chunks import jsonl_lines
from gsm8k_jax.eval.data import BUNDLED_TEST_SET, load_gsm8k
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.eval.results import ResultsError, RunFiles
from gsm8k_jax.eval.run_record import model_config, run_info, run_tag, run_tag_of
from gsm8k_jax.eval.runner import EvalConfig, evaluate
from gsm8k_jax.eval.tasks import training_prompt_warning
from gsm8k_jax.models.gemma3.sharding import make_mesh
from gsm8k_jax.models.registry import load_pretrained
from gsm8k_jax.models.specs import TINY_MODEL_DIR
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

RANK = 4


def tiny_factors():
    """Random rank-RANK factors for every module of the bundled model."""
    return random_factors(transformers.AutoConfig.from_pretrained(TINY_MODEL_DIR), RANK)


def rollouts(out_dir):
    (path,) = out_dir.glob("rollouts_*.jsonl")
    return path.name, [json.loads(line) for line in jsonl_lines(path.read_text())]


def test_lora_eval_from_local_and_gcs(tmp_path, gcs_bucket):
    factors = tiny_factors()
    run = tmp_path / "run"
    write_tunix_checkpoint(run / "actor" / "50" / "model_params", factors)
    gcs_run = f"{gcs_bucket}/eval-lora/run"
    upload_dir(run, gcs_run)
    lora = ["--model.lora_config.rank=4", "--model.lora_config.alpha=8"]

    run_script(*QUICK, f"--output_dir={tmp_path / 'base'}")
    local_run = run_script(
        *QUICK,
        *lora,
        f"--model.lora_checkpoint_path={run / 'actor'}",
        f"--output_dir={tmp_path / 'local'}",
        script=LORA_SCRIPT,
    )
    # A Tunix checkpoint records no rank or alpha: the flags' are printed.
    assert f"LoRA: rank {RANK} (given), alpha 8.0 (given);" in local_run.stdout
    run_script(
        *QUICK,
        *lora,
        f"--model.lora_checkpoint_path={gcs_run}/actor",
        f"--output_dir={tmp_path / 'gcs'}",
        script=LORA_SCRIPT,
    )
    _, base = rollouts(tmp_path / "base")
    local_name, local = rollouts(tmp_path / "local")
    gcs_name, gcs = rollouts(tmp_path / "gcs")
    assert local_name == "rollouts_gemma3-tiny_run-actor-50_r4a8_bs4.jsonl" == gcs_name
    assert [r["response"] for r in local] == [r["response"] for r in gcs]
    assert [r["response"] for r in local] != [r["response"] for r in base]
    summary = json.loads(next((tmp_path / "gcs").glob("summary_*.json")).read_text())
    assert summary["run"]["lora_checkpoint"] == f"{gcs_run}/actor/50/model_params"
    assert summary["run"]["model"]["lora_config"]["rank"] == RANK
    # A notebook names the run as the script did, from the paths given to it
    # or from the run record.
    tag = local_name.removeprefix("rollouts_").removesuffix(".jsonl")
    given = LoraConfig(rank=RANK, alpha=8.0)
    assert run_tag("gemma3-tiny", str(run / "actor"), 4, given) == tag
    assert run_tag("gemma3-tiny", f"{gcs_run}/actor", 4, given) == tag
    assert run_tag_of(summary["run"]) == tag


def test_lora_eval_rank_mismatch_is_clear(tmp_path):
    factors = tiny_factors()
    write_tunix_checkpoint(tmp_path / "run" / "actor" / "7" / "model_params", factors)
    proc = run_script(
        *QUICK,
        "--model.lora_config.rank=16",
        f"--model.lora_checkpoint_path={tmp_path / 'run' / 'actor'}",
        f"--output_dir={tmp_path / 'out'}",
        script=LORA_SCRIPT,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "rank" in proc.stderr and "16" in proc.stderr and "4" in proc.stderr
    # Alpha was left at its default: the notice says so, not "the flags".
    assert "LoRA: rank 16 (given), alpha 2.0 (default);" in proc.stdout


def _cut_array_files(params_dir):
    """Cuts every file of the arrays' data to half its size (a copy stopped
    part way, a full disk); the tree's metadata is left whole."""
    for file in (params_dir / "d").iterdir():
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "file",
            (
                "error: {path} is a file, not a LoRA checkpoint folder (expected"
                " <root>/actor/<step>/model_params, a step folder"
                " <root>/actor/<step> or <root>/actor): pass the folder."
            ),
        ),
        ("missing", "error: No LoRA checkpoint at {path}: the path does not exist."),
        (
            "damaged",
            "error: {params} is damaged or incomplete (ValueError: OUT_OF_RANGE:",
        ),
    ],
)
def test_a_bad_checkpoint_is_one_short_line(tmp_path, case, message):
    """A file gave the OS's words alone ("[Errno 20] Not a directory"); a
    damaged checkpoint gave a line of 1,500 characters (tensorstore's spec of
    the array) among dozens of "Event loop is closed" tracebacks."""
    params = tmp_path / "run" / "actor" / "7" / "model_params"
    write_tunix_checkpoint(params, tiny_factors())
    path = {
        "file": params / "_METADATA",
        "missing": tmp_path / "run" / "actor" / "8",
        "damaged": tmp_path / "run" / "actor",
    }[case]
    if case == "damaged":
        _cut_array_files(params)
    proc = run_script(
        *QUICK,
        f"--model.lora_config.rank={RANK}",
        f"--model.lora_checkpoint_path={path}",
        f"--output_dir={tmp_path / 'out'}",
        script=LORA_SCRIPT,
        check=False,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(message.format(path=path, params=params))
    assert len(proc.stderr) < 500, proc.stderr
    if case == "damaged":
        assert proc.stderr.rstrip().endswith(
            "): evaluate another step, or write this one again."
        )


def test_lora_eval_unreachable_bucket(tmp_path, gcs_bucket):
    proc = run_script(
        *QUICK,
        "--model.lora_checkpoint_path=gs://no-such-bucket-xyz/run/actor",
        f"--output_dir={tmp_path / 'out'}",
        script=LORA_SCRIPT,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no-such-bucket-xyz" in proc.stderr


def test_recorded_lora_config_is_used_and_enforced(tmp_path):
    """Our trainer's lora_config.json: its alpha is used when the flag is left
    out, and a contradicting flag is refused before anything runs."""
    factors = tiny_factors()
    actor = tmp_path / "run" / "actor"
    write_tunix_checkpoint(actor / "3" / "model_params", factors)
    save_lora_config(actor, LoraConfig(rank=RANK, alpha=8.0))
    common = [*QUICK, f"--model.lora_checkpoint_path={actor}"]
    wrong = run_script(
        *common,
        f"--model.lora_config.rank={RANK}",
        "--model.lora_config.alpha=2.0",
        f"--output_dir={tmp_path / 'wrong'}",
        script=LORA_SCRIPT,
        check=False,
    )
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert (
        "alpha=2.0 (--model.lora_config.alpha; lm-eval's model_args: lora_alpha), but"
        " the checkpoint was trained with"
        " alpha=8.0" in wrong.stderr
    )
    assert not (tmp_path / "wrong").exists()

    # Trained on other base weights (as recorded by our trainer): said once.
    other_base = "sha256:0123456789abcdef"
    settings = actor / TRAINING_SETTINGS_FILE
    # And on other prompts than the run's: said once too.
    settings.write_text(
        json.dumps({"base_model": other_base, "prompt_template": "Q: {question}"})
    )
    proc = run_script(
        *common, f"--output_dir={tmp_path / 'recorded'}", script=LORA_SCRIPT
    )
    assert "LoRA: rank" not in proc.stdout  # rank and alpha are recorded
    warning = (
        f"warning: the LoRA checkpoint was trained on base weights {other_base}"
        f" ({settings}), but {TINY_MODEL_DIR} holds {model_revision(TINY_MODEL_DIR)}"
    )
    assert proc.stderr.count(warning) == 1, proc.stderr
    warning = (
        f"warning: the LoRA checkpoint was trained on other prompts ({settings}):"
        f" --prompt_template={DEFAULT_PROMPT_TEMPLATE!r} (trained with"
        " 'Q: {question}')."
    )
    assert proc.stderr.count(warning) == 1, proc.stderr
    summary = json.loads(
        next((tmp_path / "recorded").glob("summary_*.json")).read_text()
    )
    assert summary["run"]["model"]["lora_config"]["alpha"] == 8.0
    assert summary["run"]["model"]["lora_config"]["rank"] == RANK


def test_run_info_records_the_step_and_config_load_lora_uses(tmp_path):
    """The notebook's way (`run_info` with the path given to `load_lora`):
    `<root>/actor` is recorded as its latest step, with the config recorded
    beside it, so a rerun after another step was saved is another run, not a
    resume of the earlier step's results."""
    actor = tmp_path / "run" / "actor"
    write_tunix_checkpoint(actor / "10" / "model_params", tiny_factors())
    record = functools.partial(
        run_info,
        model_config("gemma3-tiny").to_dict(),  # alpha 2.0, the default
        model_dir=TINY_MODEL_DIR,
        lora_path=str(actor),
        data_path=str(BUNDLED_TEST_SET),
        num_examples=8,
        eval_config=EvalConfig(),
    )
    first = record()
    assert first["lora_checkpoint"] == str(actor / "10" / "model_params")
    assert first["model"]["lora_config"]["alpha"] == 2.0  # None recorded.
    write_tunix_checkpoint(actor / "12" / "model_params", tiny_factors())
    save_lora_config(actor, LoraConfig(rank=RANK, alpha=16.0))
    later = record()
    assert later["lora_checkpoint"] == str(actor / "12" / "model_params")
    assert later["model"]["lora_config"] == dataclasses.asdict(
        LoraConfig(rank=RANK, alpha=16.0)
    )
    # Named as the scripts name them: by step, with the recorded rank and
    # alpha where there are any (else the config given).
    assert run_tag_of(first) == "gemma3-tiny_run-actor-10_r16a2_bs32"
    assert run_tag_of(later) == "gemma3-tiny_run-actor-12_r4a16_bs32"
    assert run_tag("gemma3-tiny", str(actor), 32, LoraConfig()) == run_tag_of(later)
    files = RunFiles(tmp_path / "out", "tag")
    files.prepare(first, resume=True, overwrite=False)
    files.chunks.commit([{"id": 0, "sample_index": 0}])  # A first result.
    with pytest.raises(ResultsError, match="differing: lora_checkpoint"):
        files.check(lambda: later, resume=True, overwrite=False)


@pytest.mark.parametrize(
    "settings, recorded",
    [
        (None, None),  # Tunix's own checkpoints, ours from before the record
        ("{not json", None),  # damaged: the trainer's resume says so, not this
        (json.dumps({"seed": 0}), None),
        (json.dumps({"base_model": "same"}), "same"),
        (json.dumps({"base_model": "sha256:0123456789abcdef"}), "other"),
    ],
)
def test_the_recorded_base_weights_are_compared(tmp_path, settings, recorded):
    """Only a readable record of other base weights than the model's warns."""
    actor = tmp_path / "run" / "actor"
    write_tunix_checkpoint(actor / "3" / "model_params", tiny_factors())
    revision = model_revision(TINY_MODEL_DIR)
    if settings is not None:
        (actor / TRAINING_SETTINGS_FILE).write_text(settings.replace("same", revision))
    trained = resolve_trained_lora(actor, LoraConfig(rank=RANK))
    warning = trained.base_model_warning(revision, TINY_MODEL_DIR)
    if recorded == "other":
        assert trained.base_model == "sha256:0123456789abcdef"
        assert warning.startswith(
            "the LoRA checkpoint was trained on base weights sha256:0123456789abcdef"
        )
    else:
        assert trained.base_model == (revision if recorded else None)
        assert warning == ""


@pytest.mark.parametrize(
    "settings, differing",
    [
        ({}, None),
        ({"task": "gsm8k_cot"}, None),  # lm-eval's prompts: a choice made apart
        ({"prompt_template": "Q: {question}"}, "--prompt_template='Q: {question}'"),
        ({"system_prompt": "Be brief."}, "--system_prompt (trained with none)"),
        ({"use_chat_template": False}, "--nouse_chat_template (trained chat-"),
    ],
)
def test_prompts_other_than_the_training_runs_warn(settings, differing):
    """Our trainer's prompts are its template as the user turn, chat-templated,
    with no system turn; a run on others (flags left at the default here)
    warns, naming each difference; Tunix's checkpoints record none."""
    config = EvalConfig(**settings)
    warning = training_prompt_warning(DEFAULT_PROMPT_TEMPLATE, "where", config)
    assert training_prompt_warning(None, "where", config) == ""
    if differing is None:
        assert warning == ""
    else:
        assert warning.startswith("the LoRA checkpoint was trained on other prompts")
        assert differing in warning and "(where)" in warning


# A notebook's evaluation, kept short: 2 problems, 4 tokens.
SHORT = EvalConfig(batch_size=2, sampling=SamplingParams(max_generation_steps=4))


@pytest.fixture(scope="module")
def trained_actor(tmp_path_factory):
    """A checkpoint recording its rank and alpha, as our trainer writes it."""
    actor = tmp_path_factory.mktemp("notebook_lora") / "run" / "actor"
    write_tunix_checkpoint(actor / "4" / "model_params", tiny_factors())
    save_lora_config(actor, LoraConfig(rank=RANK, alpha=8.0))
    return actor


def notebook_run(output_dir, lora_path="", dtype="bfloat16", **kwargs):
    """(run_info, prepared RunFiles) as the notebook makes them."""
    info = run_info(
        {**model_config("gemma3-tiny").to_dict(), "dtype": dtype},
        model_dir=TINY_MODEL_DIR,
        lora_path=str(lora_path),
        data_path=str(BUNDLED_TEST_SET),
        num_examples=2,
        eval_config=SHORT,
        **kwargs,
    )
    files = RunFiles(output_dir, run_tag_of(info))
    files.prepare(info, resume=True, overwrite=False)
    return info, files


def evaluate_short(sampler, files, info):
    return evaluate(
        sampler,
        load_gsm8k(num_examples=2),
        SHORT,
        files,
        run_info=info,
        show_progress=False,
    )


def only_the_run_record(files):
    """Whether the folder holds the run's record and no result."""
    names = sorted(p.name for p in Path(files.output_dir).iterdir())
    return names == [f"run_{files.tag}.json"] and not files.has_results()


def test_evaluate_takes_an_output_folder(tmp_path):
    """A folder for files: the run's files there under run_tag_of(run_info),
    resumed when run again, the same rows as a prepared RunFiles writes; and
    run_info's defaults are the base model and the bundled test set."""
    model, tokenizer, _ = load_pretrained("gemma3-tiny")
    sampler = Sampler(model, tokenizer)
    info = run_info(
        model_config("gemma3-tiny").to_dict(),
        model_dir=TINY_MODEL_DIR,
        num_examples=2,
        eval_config=SHORT,
    )
    prepared_info, prepared = notebook_run(tmp_path / "prepared")
    assert info == prepared_info
    first = evaluate_short(sampler, tmp_path / "folder", info)
    files = RunFiles(tmp_path / "folder", run_tag_of(info))
    rows = files.read_rollouts()
    again = evaluate_short(sampler, str(tmp_path / "folder"), info)
    assert again["correct"] == first["correct"] and files.read_rollouts() == rows
    evaluate_short(sampler, prepared, prepared_info)
    response = operator.itemgetter("id", "response", "logprob")
    assert list(map(response, prepared.read_rollouts())) == list(map(response, rows))
    # A refused call leaves the folder as it was (preparing a record of more
    # problems would have removed the summary and rewritten the record) ...
    folder = Path(files.output_dir)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    more = {**info, "num_examples": 4}
    with pytest.raises(ValueError, match="num_examples=4 in run_info but 2"):
        evaluate_short(sampler, folder, more)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert evaluate_short(sampler, folder, info)["correct"] == first["correct"]
    # A record that cannot be written fails after the run's lock is taken:
    # the lock is released, so the run is not left "already running".
    with pytest.raises(TypeError, match="not JSON serializable"):
        evaluate_short(sampler, tmp_path / "new", {**info, "note": {"a set"}})
    assert evaluate_short(sampler, tmp_path / "new", info)["total"] == 2


def test_evaluate_refuses_a_run_record_of_other_settings(tmp_path):
    """evaluate takes the settings, the problems and the model apart from
    run_info: where they disagree with it, a notebook's rows went under the
    tag and record of another run (and a script with those settings would
    adopt them). Refused before any result is written, naming each
    difference."""
    model, tokenizer, _ = load_pretrained("gemma3-tiny")  # bfloat16
    sampler = Sampler(model, tokenizer)
    info, files = notebook_run(tmp_path / "run")
    float32_info, float32_files = notebook_run(tmp_path / "float32", dtype="float32")
    longer = dataclasses.replace(
        SHORT, sampling=dataclasses.replace(SHORT.sampling, max_generation_steps=8)
    )

    def call(config=SHORT, num_examples=2, files=files, info=info):
        return evaluate(
            sampler,
            load_gsm8k(num_examples=num_examples),
            config,
            files,
            run_info=info,
            show_progress=False,
        )

    for kwargs, difference in (
        (
            {"config": longer},
            "eval.sampling.max_generation_steps=4 in run_info but 8 in config",
        ),
        ({"num_examples": 3}, "num_examples=2 in run_info but 3 in examples"),
        (
            {"files": float32_files, "info": float32_info},
            "model.dtype='float32' in run_info but 'bfloat16' in the model",
        ),
    ):
        with pytest.raises(
            ValueError,
            match="^run_info does not record what this call runs:"
            f" {re.escape(difference)}\\. Make run_info for this run",
        ):
            call(**kwargs)
        assert only_the_run_record(kwargs.get("files", files))
    # What a record leaves unsaid is not compared: an older greedy record
    # holds the unused seed flag's value, and one from before mesh_model
    # none (None once read, `with_later_settings`).
    older = json.loads(json.dumps(info))
    older["eval"]["sampling"]["seed"] = 0
    older["mesh_model"] = None
    assert call(info=older)["total"] == 2


def test_evaluate_refuses_a_lora_the_run_record_contradicts(trained_actor, tmp_path):
    """A notebook cell rerun after load_lora, whose run_info says base, wrote
    the LoRA's answers under the base run's tag (and the reverse, the base
    model's under the LoRA's): refused in one line naming the fix, before
    any result is written."""
    model, tokenizer, _ = load_pretrained("gemma3-tiny")  # bfloat16
    sampler = Sampler(model, tokenizer)
    params_path = str(trained_actor / "4" / "model_params")
    base_info, base_files = notebook_run(tmp_path / "base")
    lora_info, lora_files = notebook_run(tmp_path / "lora", trained_actor)
    merged_info, merged_files = notebook_run(
        tmp_path / "merged", trained_actor, lora_mode="merged"
    )
    base_message = (
        "The model carries a LoRA (attached) but run_info records the base model"
        " (lora_path=''): evaluate it under its checkpoint's run_info"
        " (lora_path=...), or detach_lora(model) first."
    )
    merged_message = (
        f"run_info records LoRA checkpoint {params_path} merged but the model"
        " carries its LoRA attached: pass run_info(..., lora_mode='attached'),"
        f" or apply it as recorded (load_lora(model, {params_path!r}, ...,"
        " merge=True), on the base model)."
    )
    refusals = [
        (base_files, base_info, base_message),
        (merged_files, merged_info, merged_message),
    ]
    load_lora(model, trained_actor)
    for files, info, message in refusals:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            evaluate_short(Sampler(model, tokenizer), files, info)
        assert only_the_run_record(files)
    detach_lora(model)
    message = (
        f"run_info records LoRA checkpoint {params_path} (attached) but the model"
        f" carries none: load_lora(model, {params_path!r}, ...) first."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        evaluate_short(sampler, lora_files, lora_info)
    assert only_the_run_record(lora_files)
    # The refused runs were released: a model that agrees runs them.
    assert evaluate_short(sampler, base_files, base_info)["total"] == 2


def test_evaluate_runs_a_lora_the_run_record_agrees_with(trained_actor, tmp_path):
    """Attached as recorded; a record without a mode (older ones) or with
    "custom" (a sweep's own loader) is not checked."""
    model, tokenizer, _ = load_pretrained("gemma3-tiny")
    load_lora(model, trained_actor)
    sampler = Sampler(model, tokenizer)
    info, files = notebook_run(tmp_path / "attached", trained_actor)
    summary = evaluate_short(sampler, files, info)
    assert summary["total"] == 2 and summary["run"]["lora_mode"] == "attached"
    older = {k: v for k, v in info.items() if k != "lora_mode"}
    files = RunFiles(tmp_path / "older", run_tag_of(older))
    files.prepare(older, resume=True, overwrite=False)
    assert "lora_mode" not in evaluate_short(sampler, files, older)["run"]
    info, files = notebook_run(tmp_path / "custom", trained_actor, lora_mode="custom")
    assert evaluate_short(sampler, files, info)["run"]["lora_mode"] == "custom"
    with pytest.raises(ValueError, match=r"lora_mode must be one of \("):
        notebook_run(tmp_path / "typo", trained_actor, lora_mode="merge")


def test_a_merged_lora_moved_onto_a_mesh_runs_as_recorded(trained_actor, tmp_path):
    """Merged into a model loaded without a mesh, whose Sampler then moves
    its weights onto one: still merged, as its record says (it read as
    carrying none, and was refused). Each run on it compiles nothing new.
    The sweep's way back to the base model (`nnx.update` with the weights
    taken before merging) makes it the base model again. In the default
    dtype; test_lora.py checks the mark itself in float32 too, where the
    merged weights keep their dtype."""
    dtype = "bfloat16"
    model, tokenizer, _ = load_pretrained("gemma3-tiny", dtype=dtype)
    base_params = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))
    load_lora(model, trained_actor, merge=True)
    sampler = Sampler(model, tokenizer, mesh=make_mesh(1, 1))
    assert isinstance(model.layers[0].attn.q_einsum.w[...].sharding, NamedSharding)
    assert lora_mode(model) == "merged"
    compiled = []
    for name in ("merged", "again"):
        info, files = notebook_run(
            tmp_path / name, trained_actor, dtype=dtype, lora_mode="merged"
        )
        assert evaluate_short(sampler, files, info)["total"] == 2
        compiled.append(sampler.num_compilations)
    assert compiled[1] == compiled[0]
    with pytest.raises(ValueError, match="already has a LoRA update merged in"):
        load_lora(model, trained_actor, merge=True)
    nnx.update(model, base_params)
    assert lora_mode(model) is None
    sampler = Sampler(model, tokenizer)
    info, files = notebook_run(
        tmp_path / "refused", trained_actor, dtype=dtype, lora_mode="merged"
    )
    params_path = str(trained_actor / "4" / "model_params")
    message = (
        f"run_info records LoRA checkpoint {params_path} (merged) but the model"
        f" carries none: load_lora(model, {params_path!r}, ..., merge=True) first."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        evaluate_short(sampler, files, info)
    base_info, base_files = notebook_run(tmp_path / "base", dtype=dtype)
    assert evaluate_short(sampler, base_files, base_info)["total"] == 2
