"""Result files in a local folder and on gs:// (the loopback emulator): chunks
committed whole, read whole or not at all, duplicates resolved the same way
every time, and the final merge. No model is loaded here."""

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from gsm8k_jax import gcs_generations, storage
from gsm8k_jax.eval import run_lease
from gsm8k_jax.eval.chunks import json_line
from gsm8k_jax.eval.results import ResultsError, ResultsWarning, RunFiles
from gsm8k_jax.eval.run_lock import RunLockedError
from gsm8k_jax.eval.run_record import (
    differing_settings,
    model_config,
    run_info,
    run_tag,
    run_tag_of,
)
from gsm8k_jax.eval.runner import EvalConfig, evaluate
from gsm8k_jax.models.specs import TINY_MODEL_DIR
from gsm8k_jax.sampling.params import SamplingParams


@pytest.fixture(params=["local", "gcs"])
def folder(request, tmp_path):
    """An empty output folder, local or in the emulated bucket."""
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("gcs_bucket")
    return f"{bucket}/{request.node.originalname}"


def record(example_id, sample=0, response="r"):
    return {"id": example_id, "sample_index": sample, "response": response}


def raw_names(folder):
    """The folder's entries as fsspec lists them, bypassing `storage`."""
    fs, path = fsspec.core.url_to_fs(folder)
    fs.invalidate_cache()
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def raw_write(path, text):
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(fs_path), exist_ok=True)
    fs.pipe_file(fs_path, text.encode())


def test_chunks_resume_and_merge(folder):
    files = RunFiles(folder, "t")
    assert not files.has_results() and files.read_finished(2) == []
    files.chunks.commit([record(0, 0, "first"), record(1, 0)])
    other = RunFiles(folder, "t", process_index=1)
    other.chunks.commit([record(0, 1), record(0, 0, "second"), record(2, 0)])
    chunk_dir = storage.join(folder, "chunks_t")
    assert raw_names(chunk_dir) == ["0000-00000000.jsonl", "0001-00000000.jsonl"]
    # A chunk that is not whole is never read, not even its complete lines;
    # a writer's temporary file is not a chunk.
    raw_write(storage.join(chunk_dir, "0001-00000001.jsonl"), json.dumps(record(1, 1)))
    raw_write(storage.join(chunk_dir, "0001-00000002.jsonl"), '{"id": 1}\n{"id')
    # Nor a whole one whose lines are not rollouts.
    raw_write(storage.join(chunk_dir, "0001-00000003.jsonl"), '{"foo": 1}\n')
    raw_write(
        storage.join(chunk_dir, "0001-00000004.jsonl"),
        json.dumps({**record(1, 1), "id": "1"}) + "\n",
    )
    raw_write(storage.join(chunk_dir, ".0000-00000001.jsonl.abc.tmp"), "")

    # Example 0 has both samples; 1 and 2 lack sample 1. Sample (0, 0) is
    # taken from the first chunk holding it, in (process, seq) order.
    rerun = RunFiles(folder, "t")
    assert rerun.has_results()
    assert rerun.read_finished(2) == [record(0, 0, "first"), record(0, 1)]
    # A rerun numbers its chunks on from its own last one, rewriting none.
    rerun.chunks.commit([record(1, 1), record(2, 1)])
    assert "0000-00000001.jsonl" in raw_names(chunk_dir)
    finished = rerun.read_finished(2)
    assert sorted((r["id"], r["sample_index"]) for r in finished) == [
        (i, s) for i in range(3) for s in range(2)
    ]

    rerun.write_rollouts(finished)
    rerun.remove_chunks()
    assert raw_names(folder) == ["rollouts_t.jsonl"]
    lines = storage.read_text(rerun.rollouts_path).splitlines()
    assert [(json.loads(x)["id"], json.loads(x)["sample_index"]) for x in lines] == [
        (i, s) for i in range(3) for s in range(2)
    ]
    # A finished run resumes from its rollouts file alone.
    assert RunFiles(folder, "t").read_finished(2) == rerun.read_rollouts()


def test_prepare_records_the_run_and_overwrite_removes_results(folder):
    files = RunFiles(folder, "t")
    files.prepare({"seed": 0}, resume=True, overwrite=False)
    files.chunks.commit([record(0)])
    with pytest.raises(RuntimeError, match="other settings \\(differing: seed\\)"):
        RunFiles(folder, "t").check(lambda: {"seed": 1}, resume=True, overwrite=False)

    def not_needed():
        raise AssertionError("only a resumed run compares its settings")

    with pytest.raises(RuntimeError, match="--resume to continue them"):
        RunFiles(folder, "t").check(not_needed, resume=False, overwrite=False)
    RunFiles(folder, "t").check(not_needed, resume=False, overwrite=True)
    fresh = RunFiles(f"{folder}-fresh", "t")
    fresh.check(not_needed, resume=True, overwrite=False)
    fresh.release()
    RunFiles(folder, "t").prepare({"seed": 1}, resume=True, overwrite=True)
    RunFiles(folder, "t").release()  # (Locally, its lock file goes with it.)
    assert raw_names(folder) == ["run_t.json"]
    assert RunFiles(folder, "t").read_run_info() == {"seed": 1}


def test_unwritable_locations_are_refused_and_left_untouched(tmp_path, gcs_bucket):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        ("", "^--output_dir is empty: name the output folder.$"),
        ("s3://bucket/run", "s3:// storage is not supported; use a local folder"),
        (str(blocker / "out"), f"{blocker} is a file, not a folder"),
        (
            "gs://no-such-bucket-xyz/run",
            "bucket gs://no-such-bucket-xyz does not exist",
        ),
    ]
    if os.path.isdir("/proc"):  # No folder can be made there, even by root.
        cases.append(
            (
                "/proc/gsm8k_jax_no_such_folder/run",
                (
                    r"^Cannot write to output folder /proc/gsm8k_jax_no_such_folder/run:"
                    r" (cannot create a folder in /proc \(.+\)|/proc is not writable)\."
                    " Choose another --output_dir.$"
                ),
            )
        )
    for path, message in cases:
        with pytest.raises(storage.StorageError, match=message):
            storage.require_writable(path)
    storage.require_writable(tmp_path / "new" / "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    storage.require_writable(f"{gcs_bucket}/probe-leaves-nothing")
    assert not storage.exists(f"{gcs_bucket}/probe-leaves-nothing")


def test_tensor_parallelism_is_a_setting_that_older_records_predate(tmp_path):
    """--mesh_model splits reductions, so a run resumed under another one
    would mix results of two programs: refused. A record from before it was
    recorded does not say which it used: any resumes it."""
    for mesh_model in (None, 1):
        files = RunFiles(tmp_path / str(mesh_model), "t")
        recorded = {"seed": 0} | ({} if mesh_model is None else {"mesh_model": 1})
        files.prepare(recorded, resume=True, overwrite=False)
        files.chunks.commit([record(0)])
        rerun = RunFiles(tmp_path / str(mesh_model), "t")
        rerun.check(lambda: {"seed": 0, "mesh_model": 1}, resume=True, overwrite=False)
        if mesh_model is None:
            rerun.check(
                lambda: {"seed": 0, "mesh_model": 2}, resume=True, overwrite=False
            )
        else:
            with pytest.raises(
                RuntimeError, match="other settings \\(differing: mesh_model\\)"
            ):
                rerun.check(
                    lambda: {"seed": 0, "mesh_model": 2}, resume=True, overwrite=False
                )


def tiny_run_info(eval_config: EvalConfig) -> dict:
    """The record of a base run of the bundled model (a small file as data)."""
    return run_info(
        model_config("gemma3-tiny").to_dict(),
        model_dir=TINY_MODEL_DIR,
        lora_path="",
        data_path=str(TINY_MODEL_DIR / "config.json"),
        num_examples=1,
        eval_config=eval_config,
    )


def test_runs_recorded_before_float32_accumulation_are_not_resumed(tmp_path):
    """Every projection accumulates in float32 now; a record without that
    setting was made by code whose bfloat16 results differ: refused."""
    current = tiny_run_info(EvalConfig())
    assert current["projection_accumulation"] == "float32"
    older = {k: v for k, v in current.items() if k != "projection_accumulation"}
    files = RunFiles(tmp_path, "t")
    files.prepare(older, resume=True, overwrite=False)
    files.chunks.commit([record(0)])
    with pytest.raises(
        RuntimeError, match="other settings \\(differing: projection_accumulation\\)"
    ):
        RunFiles(tmp_path, "t").check(lambda: current, resume=True, overwrite=False)


def test_the_data_is_recorded_by_its_digest_on_gcs_too(tmp_path, gcs_bucket):
    """A resume or a comparison tells data files apart by their digest, so a
    file changed on gs:// under the same name is another run's data."""

    def digest(data_path):
        info = run_info(
            model_config("gemma3-tiny").to_dict(),
            model_dir=TINY_MODEL_DIR,
            lora_path="",
            data_path=data_path,
            num_examples=1,
            eval_config=EvalConfig(),
        )
        return info["data_sha256"]

    local, remote = tmp_path / "test.jsonl", f"{gcs_bucket}/digest/test.jsonl"
    digests = set()
    for text in ('{"question": "a", "answer": "#### 1"}\n', "changed\n"):
        local.write_text(text)
        raw_write(remote, text)
        assert digest(remote) == digest(str(local))
        digests.add(digest(remote))
    assert len(digests) == 2
    # A run recorded before gs:// data was hashed resumes.
    files = RunFiles(tmp_path / "out", "t")
    files.prepare({"data_sha256": "gcs"}, resume=True, overwrite=False)
    files.chunks.commit([record(0)])
    files.check(lambda: {"data_sha256": digests.pop()}, resume=True, overwrite=False)


def test_a_damaged_rollouts_line_leaves_out_its_problem_alone(folder):
    """A line of a finished rollouts file that is not a rollout (edited, or
    damaged on disk) is left out with a warning naming it: its problem is
    unfinished, the others stay finished (a resume redoes it alone; the
    eval scripts' test checks the file comes back whole)."""
    files = RunFiles(folder, "t")
    rows = [record(i, s) for i in range(4) for s in range(2)]
    files.write_rollouts(rows)
    lines = storage.read_text(files.rollouts_path).splitlines(keepends=True)
    torn = '{"id": 1, "sample_index": 0, "resp'  # Example 1, sample 0.
    lines[2] = torn + "\n"
    lines[5] = "[]\n"  # Example 2, sample 1: JSON, but not a rollout.
    raw_write(files.rollouts_path, "".join(lines) + "\n")  # And a blank line.
    with pytest.warns(ResultsWarning) as caught:
        finished = RunFiles(folder, "t").read_finished(2)
    advice = (
        ") and left out: its problem counts as unfinished, and resuming the run"
        " generates it again and keeps every other line."
    )
    path, column = files.rollouts_path, torn.index('"resp') + 1
    assert [str(w.message) for w in caught] == [
        f"{path}, line 3 is damaged (not valid JSON at column {column}:"
        + f" Unterminated string starting at{advice}",
        f"{path}, line 6 is damaged (a JSON list, not a rollout object{advice}",
    ]
    assert finished == [r for r in rows if r["id"] in (0, 3)]


def test_line_breaks_inside_a_response_split_no_line(folder):
    """JSON leaves U+2028 and U+0085 unescaped; str.splitlines splits at
    them, which made such a chunk look damaged (generated again for ever)."""
    rows = [record(0, 0, "a\u2028b"), record(1, 0, "c\x85d\re")]
    files = RunFiles(folder, "t")
    files.chunks.commit(rows)
    assert RunFiles(folder, "t").read_finished(1) == rows
    files.write_rollouts(rows)
    assert storage.read_text(files.rollouts_path) == "".join(map(json_line, rows))
    assert files.read_rollouts() == rows
    files.remove_chunks()
    assert RunFiles(folder, "t").read_finished(1) == rows


def test_rows_of_problems_not_in_the_run_are_left_out(folder):
    """A chunk of another run (more problems) counts for none of this run's."""
    files = RunFiles(folder, "t")
    files.chunks.commit([record(0), record(1), record(7), record(9)])
    with pytest.warns(ResultsWarning) as caught:
        finished = RunFiles(folder, "t").read_finished(1, {0, 1, 2, 3})
    assert finished == [record(0), record(1)]
    (warning,) = caught
    assert str(warning.message) == (
        f"{folder} holds rollouts of 2 problem(s) that are not among the 4 of run"
        " 't' (ids 7, 9; from another run?): they are left out of its results."
    )
    assert len(RunFiles(folder, "t").read_finished(1)) == 4  # Ids unknown: all.


def test_a_lost_run_record_is_named_and_the_summary_copy_resumes(folder):
    """Results without run_<tag>.json cannot be checked against the settings
    of the rerun: one line naming the file, not every setting as differing.
    A finished run's summary holds a copy of the record: that resumes."""
    files = RunFiles(folder, "t")
    files.prepare({"seed": 0}, resume=True, overwrite=False)
    files.chunks.commit([record(0)])
    storage.remove(files.run_path)
    with pytest.raises(ResultsError) as refused:
        RunFiles(folder, "t").check(lambda: {"seed": 0}, resume=True, overwrite=False)
    assert str(refused.value) == (
        f"{folder} holds results of run 't' but not its run record run_t.json,"
        " which says what settings produced them, so they cannot be resumed:"
        " restore it, or use another --output_dir (--overwrite deletes the"
        " results)."
    )
    files.write_summary({"run": {"seed": 0}})
    RunFiles(folder, "t").check(lambda: {"seed": 0}, resume=True, overwrite=False)
    with pytest.raises(ResultsError, match="differing: seed"):
        RunFiles(folder, "t").check(lambda: {"seed": 1}, resume=True, overwrite=False)
    RunFiles(folder, "t").prepare({"seed": 0}, resume=True, overwrite=False)
    assert RunFiles(folder, "t").read_run_info() == {"seed": 0}


def test_a_run_is_locked_while_one_process_runs_it(tmp_path):
    """Another holder of the lock (another process: here another open file)
    refuses `check`, naming the pid it wrote; the holder itself may check
    again, and `release` frees the run and removes the lock file."""
    files = RunFiles(tmp_path, "tag")
    lock = tmp_path / ".lock_tag_p0"
    with open(lock, "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunLockedError, match=r"'tag' is already running .* 4242"):
            files.check(dict, resume=True, overwrite=False)
    files.check(dict, resume=True, overwrite=False)
    files.check(dict, resume=True, overwrite=False)  # Its own: taken again.
    assert lock.read_text() == f"{os.getpid()} on {socket.gethostname()}\n"
    # A multi-host run's other process has a lock of its own.
    other_process = RunFiles(tmp_path, "tag", process_index=1)
    other_process.check(dict, resume=True, overwrite=False)
    files.release()
    assert not lock.exists()
    with open(tmp_path / ".lock_tag_p1") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other_process.release()
    assert not any(tmp_path.iterdir())


def write_lease(path, pid, host, token="theirs"):
    """A lease as another process writes it (of this boot and pid namespace:
    this machine's where `host` is this machine)."""
    record = {
        "pid": pid,
        "host": host,
        "boot": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "pid_namespace": os.stat("/proc/self/ns/pid").st_ino,
        "token": token,
    }
    fs, fs_path = storage.filesystem(path)
    fs.pipe_file(fs_path, json.dumps(record).encode())


def wait_until(condition, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def lease_holder(path):
    return json.loads(gcs_generations.read(path)[0])


def test_a_run_on_gcs_is_leased_while_one_process_runs_it(gcs_bucket, monkeypatch):
    """On gs://: a live process's lease refuses `check` in one line naming
    it and how to end it; a lease whose process is gone from this machine is
    taken at once; the holder renews it, and learns at its next commit that
    another process took it over (its release then leaves that one's)."""
    monkeypatch.setattr(run_lease, "HEARTBEAT_S", 0.1)
    folder = f"{gcs_bucket}/leased"
    lease = f"{folder}/.lock_tag_p0"
    files = RunFiles(folder, "tag")
    here = socket.gethostname()
    with subprocess.Popen(
        [sys.executable, "-c", "input()"], stdin=subprocess.PIPE
    ) as live:
        write_lease(lease, live.pid, here)
        with pytest.raises(
            RunLockedError,
            match=(
                rf"^Run 'tag' is already running in {re.escape(folder)} \(process"
                rf" {live.pid} on {re.escape(here)}, last heard from \d+ s ago\): .*"
                rf" lapses in \d+ s, or delete {re.escape(lease)}\.$"
            ),
        ):
            files.check(dict, resume=True, overwrite=False)
        live.communicate(b"\n")
    files.check(dict, resume=True, overwrite=False)  # Its process is gone.
    files.check(dict, resume=True, overwrite=False)  # Its own: taken again.
    assert lease_holder(lease)["pid"] == os.getpid()
    generation = gcs_generations.read(lease)[1]
    wait_until(lambda: gcs_generations.read(lease)[1] != generation)  # Renewed.
    files.append([])

    write_lease(lease, 1, "elsewhere", token="new")  # Taken over meanwhile.
    wait_until(lambda: run_lease._HELD[lease].lost)
    with pytest.raises(RunLockedError, match="no longer holds .* took it over"):
        files.append([])
    files.release()
    assert lease_holder(lease)["token"] == "new"


def test_a_lapsed_lease_is_taken_over_only_as_seen(gcs_bucket, monkeypatch):
    """Another machine's lease holds until LEASE_S (Cloud Storage's clock)
    has passed since its last renewal, then is taken over; a taker that
    finds it renewed or replaced between its look and its takeover (another
    taker was quicker) leaves it and is refused. A holder none of whose
    renewals gets through stops at its next commit."""
    monkeypatch.setattr(run_lease, "LEASE_S", 1.0)
    monkeypatch.setattr(run_lease, "HEARTBEAT_S", 0.25)
    folder = f"{gcs_bucket}/lapsed"
    lease = f"{folder}/.lock_tag_p0"
    files = RunFiles(folder, "tag")
    write_lease(lease, 1, "elsewhere")
    with pytest.raises(RunLockedError, match="process 1 on elsewhere"):
        files.check(dict, resume=True, overwrite=False)
    wait_until(lambda: gcs_generations.read(lease)[2] > 1.5)
    look = gcs_generations.read

    def quicker_rival(path):
        seen = look(path)
        monkeypatch.setattr(gcs_generations, "read", look)
        write_lease(path, 2, "rival", token="rival")
        return seen  # Lapsed, as this taker saw it.

    monkeypatch.setattr(gcs_generations, "read", quicker_rival)
    with pytest.raises(RunLockedError, match="process 2 on rival"):
        files.check(dict, resume=True, overwrite=False)
    assert lease_holder(lease)["token"] == "rival"
    wait_until(lambda: gcs_generations.read(lease)[2] > 1.5)
    files.check(dict, resume=True, overwrite=False)
    assert lease_holder(lease)["pid"] == os.getpid()
    files.release()
    assert not storage.exists(lease)

    files.check(dict, resume=True, overwrite=False)
    files.append([])

    def unreachable(*args):
        raise OSError("network down")

    monkeypatch.setattr(gcs_generations, "write_if", unreachable)
    time.sleep(1.0)
    with pytest.raises(RunLockedError, match="no renewal got through"):
        files.append([])
    files.release()


def test_a_refused_check_holds_no_lock_and_a_lock_is_one_per_folder(tmp_path):
    """A check that refuses (results of other settings) releases the lock it
    took; the same folder spelled another way is the same lock, taken again
    by its holder; a lock whose folder was removed releases quietly."""
    out = tmp_path / "out"
    files = RunFiles(out, "tag")
    files.prepare({"seed": 0}, resume=True, overwrite=False)
    files.chunks.commit([record(0)])
    files.release()
    with pytest.raises(ResultsError, match="other settings"):
        RunFiles(out, "tag").check(lambda: {"seed": 1}, resume=True, overwrite=False)
    assert not (out / ".lock_tag_p0").exists()
    RunFiles(out, "tag").check(dict, resume=True, overwrite=True)
    RunFiles(f"{tmp_path}/./out/../out", "tag").check(dict, resume=True, overwrite=True)
    shutil.rmtree(out)
    files.release()
    RunFiles(out, "tag").check(dict, resume=True, overwrite=False)  # Free again.
    files.release()


def test_names_that_moved_are_still_found_where_they_were():
    """Configs written before run_record.py import model_config from results."""
    from gsm8k_jax.eval import results, run_record

    for name in ("model_config", "run_info", "run_tag"):
        assert getattr(results, name) is getattr(run_record, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        results.nope  # noqa: B018


def test_moved_data_and_weights_are_the_same_settings():
    """A moved clone or another HF cache reads the same files from other
    paths: their digests say they are the same, so a resume goes on (it
    was refused, with advice to --overwrite the results)."""

    def record(root):
        return {
            "data_path": f"{root}/clone/test.jsonl",
            "data_sha256": "abc",
            "model_dir": f"{root}/hf/snapshot",
            "model_revision": "sha256:123",
            "model": {"model_path": f"{root}/hf/snapshot"},
        }

    moved = record("/new")
    assert differing_settings(record("/old"), moved) == []
    other = moved | {"data_sha256": "def", "model_revision": "sha256:456"}
    assert differing_settings(record("/old"), other) == [
        "data_path",
        "data_sha256",
        "model.model_path",
        "model_dir",
        "model_revision",
    ]


def test_evaluate_needs_a_prepared_run(tmp_path):
    """Without `prepare` no record says what made the results (compare could
    not place them) and no lock is held: refused before any work."""
    with pytest.raises(ValueError, match="holds no run record of run 't': call"):
        evaluate(None, [], EvalConfig(), RunFiles(tmp_path, "t"), run_info={})
    assert not any(tmp_path.iterdir())


def test_a_sampled_run_is_named_by_its_sampling_settings():
    """Runs of other seeds, temperatures or nucleus settings never share
    files; greedy runs read none of them, and name none."""
    sampled = SamplingParams(
        temperature=0.8, top_p=0.95, top_k=40, num_samples=4, seed=3
    )
    tag = "gemma3-tiny_base_t0.8p0.95k40_n4_seed3_bs16"
    assert run_tag("gemma3-tiny", "", 16, sampling=sampled) == tag
    record = tiny_run_info(EvalConfig(batch_size=16, sampling=sampled))
    assert run_tag_of(record) == tag
    greedy = SamplingParams(top_p=0.5, seed=7)
    assert run_tag("gemma3-tiny", "", 16, sampling=greedy) == "gemma3-tiny_base_bs16"


def test_beside_a_greedy_run_only_the_temperature_differs():
    """A greedy run records no seed, top_k or top_p (it reads none): beside a
    sampled run the temperature is the difference, not those."""

    def record(**sampling):
        return {"eval": {"sampling": sampling}}

    greedy = record(temperature=0, seed=None, top_k=None, top_p=None)
    sampled = record(temperature=0.7, seed=3, top_k=0, top_p=1.0)
    assert differing_settings(greedy, sampled) == ["eval.sampling.temperature"]
    other_seed = record(temperature=0.7, seed=4, top_k=0, top_p=1.0)
    assert differing_settings(sampled, other_seed) == ["eval.sampling.seed"]


def test_a_run_going_on_to_more_problems_is_unfinished_until_it_ends(tmp_path):
    """Its summary of fewer problems is removed as it goes on (a comparison
    would take it for finished); its finished rows are kept. A rerun on as
    many problems keeps the summary."""
    files = RunFiles(tmp_path, "t")
    files.prepare({"num_examples": 2}, resume=True, overwrite=False)
    files.write_rollouts([record(0), record(1)])
    files.write_summary({"run": {"num_examples": 2}})
    files.release()
    same = RunFiles(tmp_path, "t")
    same.prepare({"num_examples": 2}, resume=True, overwrite=False)
    assert same.read_summary() is not None
    same.release()
    more = RunFiles(tmp_path, "t")
    more.prepare({"num_examples": 5}, resume=True, overwrite=False)
    assert more.read_summary() is None
    assert [r["id"] for r in more.read_finished(1)] == [0, 1]
    assert more.read_run_info() == {"num_examples": 5}
    more.release()
