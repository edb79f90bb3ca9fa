"""The evaluation as a user runs it: our eval script against a plain
transformers loop, each a whole process, on the same model folder and prompts.

One random Gemma 3 of a benchmark config is saved as a Hugging Face folder
(with the bundled 4,096-token tokenizer and its eos ids), then, one after the
other on the same machine:

- ours, cold: `research/script/eval_gsm8k_base.py` with an empty persistent
  compilation cache (what a first run pays: imports, loading, compiling);
- the reference: `gsm8k_jax.benchmarks.hf_eval`, transformers' `generate`
  in static batches of the same size over the same prompt strings;
- ours, warm: the same command again, its compiled programs now in the cache
  (what every later run of the same shapes pays).

Each is timed from process start to exit. With random weights the answers
run to the length limit, so continuous batching cannot help: the cost of a
step decides. In float32 both sides should write the same responses
(`identical_responses`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gsm8k_jax.benchmarks.models import (
    HF_SMALL,
    hf_text_config,
    make_random_hf_model,
)
from gsm8k_jax.eval import tasks
from gsm8k_jax.eval.chunks import jsonl_lines
from gsm8k_jax.eval.data import BUNDLED_TEST_SET, load_gsm8k
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.models.specs import TINY_MODEL_DIR

EVAL_SCRIPT = Path(__file__).resolve().parents[2] / "research/script/eval_gsm8k_base.py"
# What the folder takes from the bundled model besides random weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class CliBenchmarkConfig:
    """model: "hf-small", a named Gemma 3 size (e.g. "gemma3-270m") or a dict
    of `transformers.Gemma3TextConfig` keyword arguments (tests)."""

    model: str | dict[str, Any] = "hf-small"
    num_examples: int = 64
    batch_size: int = 16
    max_generation_steps: int = 64
    dtype: str = "float32"
    seed: int = 0


def make_model_folder(model: str | dict[str, Any], path: Path, seed: int) -> None:
    """A Hugging Face folder of random weights with the bundled tokenizer."""
    text_config = hf_text_config(HF_SMALL if model == "hf-small" else model)
    make_random_hf_model(text_config, path, seed=seed)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_MODEL_DIR / name, path / name)


def _prompts(model_dir: Path, num_examples: int) -> list[str]:
    """The eval script's default (boxed, chat template) prompt strings."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    examples = load_gsm8k(BUNDLED_TEST_SET, num_examples=num_examples)
    return tasks.format_prompts(
        tasks.get_task(tasks.BOXED),
        [e.question for e in examples],
        tokenizer,
        template=DEFAULT_PROMPT_TEMPLATE,
        system_prompt=None,
        use_chat_template=True,
    )


def _timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{command[1]} failed:\n{done.stderr[-3000:]}")
    return wall


def run_cli_benchmark(cfg: CliBenchmarkConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = root / "model"
        make_model_folder(cfg.model, model_dir, cfg.seed)
        prompts = _prompts(model_dir, cfg.num_examples)
        prompts_file = root / "prompts.jsonl"
        prompts_file.write_text(
            "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
        )
        env = os.environ | {"GSM8K_JAX_CACHE": str(root / "cache")}

        def ours(name: str) -> float:
            return _timed(
                [
                    sys.executable,
                    str(EVAL_SCRIPT),
                    f"--model.model_path={model_dir}",
                    f"--model.dtype={cfg.dtype}",
                    f"--num_examples={cfg.num_examples}",
                    f"--batch_size={cfg.batch_size}",
                    f"--max_generation_steps={cfg.max_generation_steps}",
                    f"--output_dir={root / name}",
                ],
                env,
            )

        reference_out = root / "reference.jsonl"
        walls = {"ours_cold": ours("cold")}
        walls["reference"] = _timed(
            [
                sys.executable,
                "-m",
                "gsm8k_jax.benchmarks.hf_eval",
                f"--model_dir={model_dir}",
                f"--prompts={prompts_file}",
                f"--output={reference_out}",
                f"--batch_size={cfg.batch_size}",
                f"--max_new_tokens={cfg.max_generation_steps}",
                f"--dtype={cfg.dtype}",
            ],
            env,
        )
        walls["ours_warm"] = ours("warm")
        cached = sum(1 for f in (root / "cache").rglob("*") if f.is_file())
        ours_rows = _read_rollouts(root / "warm")
        summary = json.loads(next((root / "warm").glob("summary_*.json")).read_text())
        reference_rows = [
            json.loads(line)["response"]
            for line in reference_out.read_text().splitlines()
        ]
    same = [a == b for a, b in zip(ours_rows, reference_rows, strict=True)]
    return {
        "settings": dataclasses.asdict(cfg)
        | {"model": cfg.model if isinstance(cfg.model, str) else "custom-hf"},
        "wall_s": walls,
        "ratio_cold": walls["reference"] / walls["ours_cold"],
        "ratio_warm": walls["reference"] / walls["ours_warm"],
        "ours_phase_seconds": summary["phase_seconds"],
        "generated_tokens": summary["generated_tokens"],
        "identical_responses": sum(same) / len(same),
        "compilation_cache_files": cached,
        "loadavg_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }


def _read_rollouts(folder: Path) -> list[str]:
    path = next(folder.glob("rollouts_*.jsonl"))
    rows = [json.loads(line) for line in jsonl_lines(path.read_text())]
    return [r["response"] for r in sorted(rows, key=lambda r: r["id"])]


def format_cli_benchmark(result: dict[str, Any]) -> str:
    s, w = result["settings"], result["wall_s"]
    phases = ", ".join(f"{k} {v:.1f}" for k, v in result["ours_phase_seconds"].items())
    return "\n".join(
        [
            f"Eval CLI: model={s['model']} dtype={s['dtype']} batch={s['batch_size']}"
            f" problems={s['num_examples']} max_new_tokens={s['max_generation_steps']}"
            f" ({result['generated_tokens']} tokens)",
            f"{'whole process (s)':28}{'ours':>10}{'transformers':>14}{'ratio':>8}",
            f"{'cold compilation cache':28}{w['ours_cold']:10.1f}"
            f"{w['reference']:14.1f}{result['ratio_cold']:8.2f}",
            f"{'warm compilation cache':28}{w['ours_warm']:10.1f}"
            f"{w['reference']:14.1f}{result['ratio_warm']:8.2f}",
            f"ours (warm) phases, s: {phases}",
            f"identical responses: {result['identical_responses']:.3f};"
            f" load average at the end {result['loadavg_end'][0]:.1f}"
            f" on {result['cpu_count']} CPUs",
        ]
    )
