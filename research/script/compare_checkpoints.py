r"""Compares GSM8K runs: runs on disk, or LoRA checkpoints it evaluates first.

Runs on disk (results folders, or their rollouts/summary files); a run that
has not finished is compared on the problems it finished and marked
incomplete:

    python research/script/compare_checkpoints.py \
        --results=results/base,results/lora --baseline=0 --output_dir=results/cmp

Evaluate a base model and its LoRA checkpoints (base weights loaded once;
model and evaluation flags as for eval_gsm8k.py), then compare them:

    python research/script/compare_checkpoints.py --model.model_name=gemma3-1b-it \
        --model.lora_config.rank=16 --model.lora_config.alpha=2.0 \
        --lora_checkpoints=gs://bucket/run/actor/500,gs://bucket/run/actor/1000 \
        --output_dir=results/sweep --batch_size=32

With several devices, --devices_per_checkpoint splits them into groups that
evaluate different checkpoints side by side (each group its own mesh, of
--mesh_model tensor-parallel devices), e.g. 8 GPUs, 4 checkpoints at a time:

    python research/script/compare_checkpoints.py --model.model_name=gemma3-4b-it \
        --lora_checkpoints=ckpt/actor/100,ckpt/actor/200,ckpt/actor/300 \
        --devices_per_checkpoint=2 --mesh_model=2 --output_dir=results/sweep

On several hosts (a TPU pod slice), start the same command on every host
with --distributed: the hosts evaluate different checkpoints (host p takes
runs p, p + hosts, ...; the base model is run 0) into the shared
--output_dir (e.g. gs://), and host 0 compares them all.

Writes comparison.md, comparison.json and accuracy.png into --output_dir
(a local folder or gs://; --results may be on gs:// too) and prints the
Markdown report, which says for each run against the baseline whether the
difference is significant at 5% (McNemar's exact test). Every run is scored
again from its responses with --extraction_method (default strict).
"""

import sys
from pathlib import Path

from gsm8k_jax.quiet import quiet_imports

quiet_imports()  # Before anything loads transformers.

from absl import flags

from gsm8k_jax.checkpoints.lora_config import LoraConfig
from gsm8k_jax.checkpoints.sources import resolve_model_dir
from gsm8k_jax.eval import cli_flags, script_main
from gsm8k_jax.eval.comparison import check_baseline, compare_runs
from gsm8k_jax.eval.report import save_report
from gsm8k_jax.eval.runs import RunResult, load_runs
from gsm8k_jax.models.specs import model_spec
from gsm8k_jax.storage import require_writable

_RESULTS = flags.DEFINE_list(
    "results", [], "Results folders or files to compare (instead of evaluating)."
)
_BASELINE = flags.DEFINE_string(
    "baseline",
    "",
    "Index or tag of the baseline run; default: the base model's run that"
    " finished the most problems (else the run that did).",
)
_LORA_CHECKPOINTS = flags.DEFINE_list(
    "lora_checkpoints", [], "LoRA checkpoints to evaluate (local or gs://)."
)
_INCLUDE_BASE = flags.DEFINE_bool(
    "include_base", True, "Also evaluate the base model (with --lora_checkpoints)."
)
_DEVICES_PER_CHECKPOINT = flags.DEFINE_integer(
    "devices_per_checkpoint",
    0,
    "With --lora_checkpoints: local devices per checkpoint; the devices split into"
    " groups that evaluate checkpoints side by side (0: all devices, one checkpoint"
    " after another). Must divide the local devices; --mesh_model must divide it.",
)
_NUM_RESAMPLES = flags.DEFINE_integer(
    "num_resamples", 10_000, "Paired bootstrap resamples."
)


def _baseline_flag() -> int | str | None:
    value = _BASELINE.value
    return int(value) if value.isdigit() else value or None


def _check_baseline_flag(tags: list[str]) -> None:
    """Refuses a --baseline that names none of the runs, before they run."""
    if (baseline := _baseline_flag()) is not None:
        check_baseline(tags, baseline)


def _evaluate() -> list[RunResult] | None:
    """The runs of the base model and --lora_checkpoints, evaluated first;
    None on the processes other than 0 of a multi-host run."""
    # Only an evaluation needs jax and the models (comparing runs on disk
    # does not): imported here, so that --results answers sooner.
    import jax

    from gsm8k_jax.eval import cli
    from gsm8k_jax.eval.sweep import evaluate_checkpoints

    cli.start_jax()
    cfg = cli_flags.FLAGS.model
    cli_flags.check_model_config(cfg)
    model_dir = resolve_model_dir(
        cfg.model_path or model_spec(cfg.model_name).default_path
    )
    runs = evaluate_checkpoints(
        cfg.model_name,
        cfg.model_path,
        _LORA_CHECKPOINTS.value,
        LoraConfig(**cfg.lora_config.to_dict()),
        cli.eval_config_from_flags(model_dir),
        cli_flags.FLAGS.output_dir,
        given_lora_fields=cli_flags.given_lora_fields(sys.argv),
        include_base=_INCLUDE_BASE.value,
        data_path=cli_flags.FLAGS.data_path,
        num_examples=cli_flags.FLAGS.num_examples,
        dtype=cfg.dtype,
        resume=cli_flags.FLAGS.resume,
        overwrite=cli_flags.FLAGS.overwrite,
        devices_per_checkpoint=_DEVICES_PER_CHECKPOINT.value,
        mesh_model=cli_flags.FLAGS.mesh_model,
        process_index=jax.process_index(),
        num_processes=jax.process_count(),
        check_tags=_check_baseline_flag,
    )
    if cli_flags.FLAGS.distributed and jax.process_index() != 0:
        print(f"Evaluated {[r.tag for r in runs]}; process 0 compares the runs.")
        return None
    return runs


# Flags that shape a comparison of runs on disk, or only how the processes
# start (a launcher may pass them to every command): every other evaluation
# flag only shapes the evaluation that --lora_checkpoints runs first.
_NOT_EVALUATION_FLAGS = (
    "output_dir",
    "extraction_method",
    "model",
    "compilation_cache_dir",
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    "heartbeat_timeout_s",
    "barrier_timeout_s",
)


def _evaluation_flags_given() -> list[str]:
    """The evaluation flags on the command line (`--model.<field>` too)."""
    here = (_INCLUDE_BASE.name, _DEVICES_PER_CHECKPOINT.name)
    names = [
        f.name for f in cli_flags.FLAGS.get_key_flags_for_module(cli_flags.__name__)
    ]
    given = [
        f"--{name}"
        for name in sorted((*names, *here))
        if name not in _NOT_EVALUATION_FLAGS and cli_flags.FLAGS[name].present
    ]
    return given + [
        f"--model.{f}" for f in sorted(cli_flags.given_model_fields(sys.argv))
    ]


def main(argv: list[str]) -> None:
    del argv
    require_writable(cli_flags.FLAGS.output_dir)
    if _RESULTS.value and _LORA_CHECKPOINTS.value:
        raise ValueError("Pass either --results or --lora_checkpoints, not both.")
    if _RESULTS.value and (ignored := _evaluation_flags_given()):
        raise ValueError(
            f"{', '.join(ignored)} set how --lora_checkpoints are evaluated;"
            " --results compares runs as they were recorded: drop them."
        )
    if _RESULTS.value:
        runs = [run for path in _RESULTS.value for run in load_runs(path)]
        seen = set()
        for run in runs:
            if (run.source, run.tag) in seen:
                raise ValueError(
                    f"--results names run '{run.tag}' in {run.source} twice: list"
                    " each folder or file once."
                )
            seen.add((run.source, run.tag))
    elif _LORA_CHECKPOINTS.value:
        runs = _evaluate()
        if runs is None:
            return
    else:
        raise ValueError(
            "Nothing to compare: pass --results=<folders or files> to compare finished"
            " runs, or --lora_checkpoints=<paths> to evaluate checkpoints first."
        )
    report = compare_runs(
        runs,
        _baseline_flag(),
        num_resamples=_NUM_RESAMPLES.value,
        extraction_method=cli_flags.FLAGS.extraction_method,
    )

    markdown = save_report(report, cli_flags.FLAGS.output_dir)
    print(markdown)
    print(
        f"Wrote comparison.md, comparison.json and accuracy.png to"
        f" {cli_flags.FLAGS.output_dir}."
    )


if __name__ == "__main__":
    cli_flags.define_flags(
        Path(__file__).resolve().parents[2] / "configs" / "gemma3_tiny.py"
    )
    script_main.run_main(main)
