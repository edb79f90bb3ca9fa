"""What the scripts print when asked for help or given something wrong: the
project's flags, one line per problem, quickly. Nothing here loads a model."""

import logging
import os
import socket
import sys
import time

import pytest
from absl import flags
from absl import logging as absl_logging
from eval.test_eval_scripts import BASE_SCRIPT, LORA_SCRIPT, REPO, run_script
from fresh_interpreter import imported_after

from gsm8k_jax import quiet, storage
from gsm8k_jax.checkpoints import lora_checkpoint, sources

COMPARE_SCRIPT = REPO / "research" / "script" / "compare_checkpoints.py"
TRAIN_SCRIPT = REPO / "research" / "script" / "train_lora_sft.py"


def closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "script, expected",
    [
        (BASE_SCRIPT, ["--batch_size", "--data_path", "--output_dir"]),
        (COMPARE_SCRIPT, ["--results", "--lora_checkpoints", "--batch_size"]),
        (TRAIN_SCRIPT, ["--learning_rate", "--output_dir"]),
    ],
)
def test_help_lists_the_project_flags(script, expected):
    proc = run_script("--help", script=script, check=False)  # absl exits 1
    for flag in [*expected, "--model:"]:
        assert f"\n  {flag}" in proc.stdout, proc.stdout
    assert "lora_config.rank" in proc.stdout  # --model's fields
    assert "--alsologtostderr" not in proc.stdout  # absl's are for --helpfull


# What the scripts need only to run: --help and a flag error answer without.
HEAVY_MODULES = ("jax", "flax", "transformers", "torch")


@pytest.mark.parametrize(
    "script", [BASE_SCRIPT, LORA_SCRIPT, COMPARE_SCRIPT, TRAIN_SCRIPT]
)
@pytest.mark.parametrize("arg", ["--help", "--batchsize=3"])
def test_help_and_flag_errors_import_no_jax_or_transformers(script, arg):
    """jax and transformers take seconds to import; flags parse without them."""
    code = f"""
import runpy
sys.argv = [{str(script)!r}, {arg!r}]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
"""
    assert imported_after(code, HEAVY_MODULES) == []


@pytest.mark.parametrize(
    "arg, message",
    [
        (
            "--model.lora_confg.rank=4",
            (
                "unknown --model field --model.lora_confg.rank;"
                " did you mean --model.lora_config.rank? Known fields: dtype,"
            ),
        ),
        (
            "--model.modle_name=x",
            "did you mean --model.model_name?",
        ),
        (
            "--model=configs/nonexistent.py",
            "--model=configs/nonexistent.py: cannot load this config file",
        ),
        (
            "--flagfile=nonexistent.cfg",
            "Unable to open flagfile: [Errno 2] No such file or directory:"
            " 'nonexistent.cfg'",
        ),
    ],
)
def test_a_bad_model_flag_is_one_clean_line(tmp_path, arg, message):
    proc = run_script(arg, f"--output_dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "\\n" not in proc.stderr and "\\'" not in proc.stderr


def test_unreachable_storage_fails_in_seconds_with_one_line(tmp_path):
    port = closed_port()
    start = time.monotonic()
    proc = run_script(
        "--model.lora_checkpoint_path=gs://some-bucket/run/actor",
        f"--output_dir={tmp_path}",
        script=LORA_SCRIPT,
        check=False,
        env=dict(os.environ, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}"),
    )
    assert time.monotonic() - start < 30  # gcsfs's own retries took ~50 s
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        "error: Cannot reach Cloud Storage for gs://some-bucket/run/actor:"
        f" connecting to 127.0.0.1:{port} failed ("
    )
    assert proc.stderr.endswith("). Check STORAGE_EMULATOR_HOST.\n")


def test_library_reads_of_unreachable_storage_fail_at_once(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match="gs://b/run/actor"):
        lora_checkpoint.resolve_lora_checkpoint("gs://b/run/actor")
    with pytest.raises(storage.StorageError, match="gs://b/model"):
        sources.resolve_model_dir("gs://b/model")
    assert time.monotonic() - start < 5
    storage.require_reachable("/local/paths/are/not/checked")


def test_storage_that_never_answers_fails_in_the_probe_time(monkeypatch):
    """An endpoint that accepts connections and never replies (a stuck
    proxy): the write probe gives up, where gcsfs alone waited forever."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # Connections complete; nothing is ever read or sent.
        monkeypatch.setenv(
            "STORAGE_EMULATOR_HOST", f"127.0.0.1:{silent.getsockname()[1]}"
        )
        monkeypatch.setattr(storage, "WRITE_PROBE_TIMEOUT_S", 2.0)
        start = time.monotonic()
        with pytest.raises(
            storage.StorageError, match=r"output folder gs://b/out: no answer in 2 s"
        ):
            storage.require_writable("gs://b/out")
        assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "argv, given",
    [
        (["s", "--output_dir=x"], False),
        (["s", "--verbosity=0"], True),
        (["s", "-v", "1"], True),
        (["s", "--v=1"], True),
        (["s", "--", "--verbosity=0"], False),
        (["s", "--vocab=3"], False),
    ],
)
def test_verbosity_given(argv, given):
    assert quiet.verbosity_given(argv) == given


def test_transformers_advice_is_silenced_unless_verbose(monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
    quiet.quiet_imports(["s", "-v", "0"])
    assert "TRANSFORMERS_NO_ADVISORY_WARNINGS" not in os.environ
    quiet.quiet_imports(["s"])
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"


@pytest.mark.parametrize("present", [0, 1])
def test_logging_is_quiet_unless_verbosity_given(monkeypatch, present):
    monkeypatch.setattr(flags.FLAGS["verbosity"], "present", present)
    gcsfs_logger = logging.getLogger("gcsfs")
    levels = {name: logging.getLogger(name).level for name in ("gcsfs", "aiohttp")}
    verbosity = absl_logging.get_verbosity()
    handler = absl_logging.get_absl_handler().python_handler
    formatter = handler.formatter
    try:
        absl_logging.set_verbosity(absl_logging.INFO)
        quiet.quiet_logging()
        quiet_now = absl_logging.get_verbosity() == absl_logging.WARNING
        assert quiet_now == (not present)
        assert (gcsfs_logger.level == logging.CRITICAL) == (not present)
        # Quiet: a warning is a plain line; a logged exception keeps its
        # traceback after it.
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            record = logging.LogRecord(
                "absl",
                logging.WARNING,
                __file__,
                1,
                "a %s",
                ("warning",),
                sys.exc_info(),
            )
        text = handler.format(record)
        assert text.startswith("warning: a warning\n") == (not present), text
        assert "Traceback" in text and "RuntimeError: boom" in text
    finally:
        handler.setFormatter(formatter)
        absl_logging.set_verbosity(verbosity)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
