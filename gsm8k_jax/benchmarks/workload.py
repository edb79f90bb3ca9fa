"""A full-test-set-shaped throughput benchmark: our sampler against
transformers' `generate` on GSM8K prompts and answer lengths, in one process.

Prompts are the GSM8K test questions in the chat template and our `\\boxed{}`
prompt, tokenised with the bundled Gemma-compatible tokenizer. Answer lengths
come from one of:

- "model": the model's own eos (only meaningful for trained weights: the
  shipped gemma3-tiny, which writes GSM8K-style solutions);
- "reference": the token count of each gold solution (+1 for the eos), for
  random-weight models of the real sizes, which never stop on their own;
- a rollouts file of an earlier evaluation: each example's `num_tokens`.

Ours is `Sampler.generate` with continuous batching (`batch_size` slots,
imposed lengths through `max_tokens`). The reference runs static batches of
`batch_size` prompts in dataset order, each padded to its longest prompt and
generating until its longest answer ends, which is what `generate` costs when
rows stop at an eos. Both sides produce the same useful tokens (their sum is
the tokens/s numerator), and in float32 the same tokens (checked).

Achieved bandwidth = (bytes read) / our wall time (prefill and host work
included, so it understates the decode loop's own figure), where bytes read
= tile steps x weight bytes (every decode tile that runs reads every weight)
+ the key/value bytes the generated tokens attend to; useful bytes count the
weights once per decode step instead (a batch of several tiles reads them
once per tile). See `roofline.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import transformers

from gsm8k_jax.benchmarks import invariance as invariance_lib
from gsm8k_jax.benchmarks import roofline
from gsm8k_jax.benchmarks.models import (
    DTYPES,
    IdTokenizer,
    build_model,
    left_pad,
    load_reference,
    reference_device,
)
from gsm8k_jax.benchmarks.synthetic import peak_memory
from gsm8k_jax.eval.data import GSM8KExample, load_gsm8k
from gsm8k_jax.eval.prompts import format_prompt
from gsm8k_jax.kernel_choice import gpu_autotune_level
from gsm8k_jax.models.gemma3.config import CONFIGS
from gsm8k_jax.models.gemma3.params import PAD_ID, load_hf_model
from gsm8k_jax.models.registry import default_eos_ids
from gsm8k_jax.models.specs import TINY_MODEL_DIR
from gsm8k_jax.sampling.batching import default_prefill_chunk, round_up
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

TRAINED_MODEL = "gemma3-tiny"  # the shipped weights: real answers, real eos


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """What to run. model: "gemma3-tiny" (shipped weights), "hf-tiny", a key
    of `CONFIGS` (random weights) or a dict of `Gemma3TextConfig` kwargs."""

    model: str | dict[str, Any] = TRAINED_MODEL
    num_examples: int | None = None  # None: all 1,319 test problems
    batch_size: int = 32
    max_generation_steps: int = 768
    answer_lengths: str = "model"  # "model", "reference" or a rollouts path
    dtype: str = "float32"
    skip_reference: bool = False
    peak_bandwidth_gbps: float | None = None  # None: spec sheet or measured
    seed: int = 0
    # Also run ours at this batch size and count the rows whose tokens and
    # summed log-probability are bitwise those of the timed run.
    invariance_batch_size: int | None = None
    # The result JSON of this workload run by another process (at another
    # batch size): count the rows bitwise the same as its. Each process
    # compiles its own programs, so this also catches a compiler choosing
    # other kernels for the same shapes (e.g. a GPU autotuner's timings).
    rows_reference_json: str | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}.")
        trained = self.model == TRAINED_MODEL
        if self.answer_lengths == "model" and not trained:
            raise ValueError(
                f"Random weights never stop on their own: use"
                f" answer_lengths='reference' (or a rollouts file) with {self.model!r},"
                f" or model={TRAINED_MODEL!r}."
            )
        if (
            self.answer_lengths not in ("model", "reference")
            and not Path(self.answer_lengths).is_file()
        ):
            raise FileNotFoundError(
                f"answer_lengths {self.answer_lengths!r} is neither 'model',"
                " 'reference' nor an existing rollouts .jsonl file."
            )
        if isinstance(self.model, str) and self.model not in (
            TRAINED_MODEL,
            "hf-tiny",
            *CONFIGS,
        ):
            raise ValueError(f"Unknown model {self.model!r}.")


def gsm8k_prompts(
    num_examples: int | None,
) -> tuple[list[GSM8KExample], list[list[int]], Any]:
    """(examples, prompt token ids, tokenizer) of the bundled test set."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    examples = load_gsm8k(num_examples=num_examples)
    prompts = [
        tokenizer.encode(format_prompt(e.question, tokenizer), add_special_tokens=False)
        for e in examples
    ]
    return examples, prompts, tokenizer


def target_lengths(
    source: str, examples: list[GSM8KExample], tokenizer, max_steps: int
) -> list[int] | None:
    """Imposed answer lengths, clipped to [1, max_steps]; None for "model"."""
    if source == "model":
        return None
    if source == "reference":
        lengths = [
            len(tokenizer.encode(e.answer, add_special_tokens=False)) + 1
            for e in examples
        ]
    else:
        with open(source) as f:
            counts = {
                r["id"]: r["num_tokens"]
                for r in map(json.loads, f)
                if r.get("sample_index", 0) == 0
            }
        example_ids = [e.id for e in examples]
        missing = [i for i in example_ids if i not in counts]
        if missing:
            raise ValueError(
                f"{source} has no rollout for example ids {missing[:5]}...; pass"
                " --num_examples no larger than the run it comes from."
            )
        lengths = [counts[i] for i in example_ids]
    return [min(max(n, 1), max_steps) for n in lengths]


def run_workload(cfg: WorkloadConfig) -> dict[str, Any]:
    """Runs ours, then the reference (unless skipped); returns a JSON-ready dict."""
    dtype = DTYPES[cfg.dtype]
    examples, prompts, tokenizer = gsm8k_prompts(cfg.num_examples)
    lengths = target_lengths(
        cfg.answer_lengths, examples, tokenizer, cfg.max_generation_steps
    )
    prompt_lengths = list(map(len, prompts))
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.model == TRAINED_MODEL:
            model_dir, eos_ids = TINY_MODEL_DIR, default_eos_ids(TINY_MODEL_DIR)
            model = load_hf_model(model_dir, dtype=dtype)
        else:
            model_dir = tmp
            model = build_model(
                cfg.model, dtype, cfg.seed, tmp, with_reference=not cfg.skip_reference
            )
            eos_ids = (model.config.vocab_size,)  # never chosen: lengths imposed
        config = model.config
        if max(max(p) for p in prompts) >= config.vocab_size:
            raise ValueError(
                f"{cfg.model} has a vocabulary of {config.vocab_size}, smaller than"
                " the GSM8K tokenizer's: use a model with at least 4096 tokens."
            )
        params = SamplingParams(
            max_generation_steps=cfg.max_generation_steps, eos_ids=eos_ids
        )
        sampler = Sampler(model, IdTokenizer())
        ours, completions = _run_ours(sampler, prompts, lengths, params, cfg)
        our_tokens = [c.tokens for c in completions]
        num_tokens = list(map(len, our_tokens))
        invariance = None
        if cfg.invariance_batch_size:
            other = _generate(
                sampler, prompts, lengths, params, cfg.invariance_batch_size
            )
            invariance = invariance_lib.same_process(
                completions, other, cfg, sampler.row_tile
            )
        row_digests = [invariance_lib.row_digest(c) for c in completions]
        cross_process = (
            invariance_lib.cross_process(
                cfg.rows_reference_json,
                dataclasses.asdict(cfg),
                row_digests,
            )
            if cfg.rows_reference_json
            else None
        )
        weights = roofline.weight_bytes(model)
        kv = roofline.kv_bytes_read(config, prompt_lengths, num_tokens, model.dtype)
        traffic = weights * ours["tile_steps"] + kv
        useful = weights * ours["decode_steps"] + kv
        tile_rows = ours["tile_steps"] * sampler.row_tile
        ours["matmul_gflop"] = (
            roofline.matmul_flops(
                config, tile_rows + ours["prefilled_tokens"], tile_rows
            )
            / 1e9
        )
        del model
        peak, peak_source = (
            (cfg.peak_bandwidth_gbps, "given")
            if cfg.peak_bandwidth_gbps
            else roofline.peak_bandwidth_gbps()
        )
        ours["achieved_bandwidth_gbps"] = traffic / ours["wall_s"] / 1e9
        ours["useful_bandwidth_gbps"] = useful / ours["wall_s"] / 1e9
        ours["fraction_of_peak_bandwidth"] = ours["achieved_bandwidth_gbps"] / peak
        reference = agreement = None
        if not cfg.skip_reference:
            reference, ref_tokens = _run_reference(
                model_dir, prompts, num_tokens, eos_ids, cfg
            )
            decoded = reference["decoded_rows"]
            reference["matmul_gflop"] = (
                roofline.matmul_flops(
                    config,
                    decoded + reference["prefilled_tokens"],
                    decoded + len(prompts),
                )
                / 1e9
            )
            same = [a == b for a, b in zip(our_tokens, ref_tokens)]
            agreement = {
                "dtype": cfg.dtype,
                "identical_rows_fraction": float(np.mean(same)),
            }
    result = {
        "settings": dataclasses.asdict(cfg)
        | {"model": cfg.model if isinstance(cfg.model, str) else "custom-hf"},
        "workload": {
            "num_prompts": len(prompts),
            "prompt_tokens_mean": float(np.mean(prompt_lengths)),
            "prompt_tokens_max": max(prompt_lengths),
            # Prompt tokens with each prompt's padding to whole prefill chunks.
            "padded_prompt_tokens": sum(
                round_up(n, default_prefill_chunk()) for n in prompt_lengths
            ),
            "generated_tokens": int(sum(num_tokens)),
            "generated_tokens_mean": float(np.mean(num_tokens)),
            "generated_tokens_max": int(max(num_tokens)),
        },
        "environment": {
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__,
            "xla_gpu_autotune_level": gpu_autotune_level(),
            "loadavg_end": os.getloadavg(),
        },
        "peak_bandwidth_gbps": peak,
        "peak_bandwidth_source": peak_source,
        "bytes_read": traffic,
        "useful_bytes": useful,
        "ours": ours,
        "reference": reference,
        "agreement": agreement,
        "batch_invariance": invariance,
        "cross_process_invariance": cross_process,
        "row_digests": row_digests,
        "ratio_tokens_per_s": (
            ours["tokens_per_s"] / reference["tokens_per_s"] if reference else None
        ),
    }
    return result


def _generate(sampler, prompts, caps, params, batch_size, ids=None):
    """Completions of prompts `ids` (default: all), in that order."""
    ids = list(range(len(prompts))) if ids is None else ids
    stream = sampler.generate_stream(
        [prompts[i] for i in ids],
        params,
        example_ids=ids,
        batch_size=batch_size,
        max_prompt_len=max(map(len, prompts)),
        max_tokens=None if caps is None else [caps[i] for i in ids],
    )
    done = {c.example_id: c for group in stream for c in group}
    return [done[i] for i in ids]


def _run_ours(sampler, prompts, lengths, params, cfg):
    """Figures of one timed run after a compiling warm-up, and the completions."""
    run = lambda ids, caps: _generate(
        sampler, prompts, caps, params, cfg.batch_size, ids
    )
    rows = list(range(len(prompts)))
    # Warm-up at the workload's shapes (slots, cache length): compiles the
    # prefill and the decode, so the timed run compiles nothing.
    warm = rows[: cfg.batch_size]
    start = time.perf_counter()
    run(warm, [2] * len(rows))
    warmup_s = time.perf_counter() - start
    compiled = sampler.num_compilations
    steps_before, tiles_before = sampler.decode_steps, sampler.tile_steps
    prefilled_before = sampler.prefilled_tokens
    phases_before = sampler.phase_seconds.copy()
    start = time.perf_counter()
    completions = run(rows, lengths)
    wall = time.perf_counter() - start
    phases = sampler.phase_seconds - phases_before
    generated = sum(c.num_tokens for c in completions)
    decode_steps = sampler.decode_steps - steps_before
    memory, memory_source = peak_memory()
    figures = {
        "wall_s": wall,
        "tokens_per_s": generated / wall,
        "warmup_s": warmup_s,  # compilation, mostly
        "num_compilations": sampler.num_compilations,
        "num_compilations_after_warmup": compiled,
        "decode_steps": decode_steps,
        "tile_steps": sampler.tile_steps - tiles_before,
        "prefilled_tokens": sampler.prefilled_tokens - prefilled_before,
        # Fraction of slot-steps that produced a token (continuous batching
        # keeps this near 1 until the queue drains).
        "slot_occupancy": generated
        / (decode_steps * round_up(cfg.batch_size, sampler.row_tile)),
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
        # Where the timed run's wall time went (see Sampler.phase_seconds).
        "phase_seconds": {p: phases[p] for p in ("prefill", "decode", "host")},
    }
    return figures, completions


def _run_reference(model_dir, prompts, num_tokens, eos_ids, cfg):
    """Static batches in dataset order; each generates until its longest row
    ends (at the row's length, forced, or at an eos in "model" mode)."""
    import torch

    model = load_reference(model_dir, cfg.dtype)
    device = reference_device()
    natural = cfg.answer_lengths == "model"

    def generate(batch_prompts, steps):
        width = max(map(len, batch_prompts))
        ids, mask = left_pad(batch_prompts, width)
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                max_new_tokens=steps,
                min_new_tokens=None if natural else steps,
                do_sample=False,
                eos_token_id=list(eos_ids) if natural else None,
                pad_token_id=PAD_ID,
            )
        return out[:, width:].cpu().tolist()

    generate(prompts[:1], 2)  # warm-up
    tokens, wall, steps_run = [], 0.0, 0
    prefilled = decoded = 0  # padded tokens through prefill, rows x decode forwards
    for start in range(0, len(prompts), cfg.batch_size):
        batch = slice(start, start + cfg.batch_size)
        steps = cfg.max_generation_steps if natural else max(num_tokens[batch])
        begin = time.perf_counter()
        rows = generate(prompts[batch], steps)
        wall += time.perf_counter() - begin
        steps_run += len(rows[0])
        prefilled += len(rows) * max(map(len, prompts[batch]))
        decoded += len(rows) * (len(rows[0]) - 1)  # the first token is prefill's
        tokens += [row[:n] for row, n in zip(rows, num_tokens[batch])]
    return {
        "wall_s": wall,
        "tokens_per_s": sum(num_tokens) / wall,
        "decode_steps": steps_run,
        "prefilled_tokens": prefilled,
        "decoded_rows": decoded,
    }, tokens


def format_workload(result: dict[str, Any]) -> str:
    """A plain-text summary of `run_workload`'s result."""
    s, w, ours, ref = (
        result["settings"],
        result["workload"],
        result["ours"],
        result["reference"],
    )
    lines = [
        f"GSM8K workload: model={s['model']} dtype={s['dtype']}"
        f" batch={s['batch_size']} answers={s['answer_lengths']}"
        f" backend={result['environment']['backend']}",
        f"{w['num_prompts']} prompts (mean {w['prompt_tokens_mean']:.0f}, max"
        f" {w['prompt_tokens_max']} tokens; {w['padded_prompt_tokens']} padded),"
        f" {w['generated_tokens']} tokens generated (mean"
        f" {w['generated_tokens_mean']:.0f}, max {w['generated_tokens_max']})",
        "",
        f"{'':34}{'ours':>12}{'transformers':>14}{'ours/ref':>10}",
        f"{'wall (s)':34}{ours['wall_s']:12.2f}"
        + (f"{ref['wall_s']:14.2f}" if ref else ""),
        f"{'tokens/s':34}{ours['tokens_per_s']:12.1f}"
        + (
            f"{ref['tokens_per_s']:14.1f}{result['ratio_tokens_per_s']:10.2f}"
            if ref
            else ""
        ),
        f"{'decode steps':34}{ours['decode_steps']:12d}"
        + (f"{ref['decode_steps']:14d}" if ref else ""),
        # ref/ours: on a compute-bound device, about the best tokens/s ratio.
        f"{'weight matmuls (GFLOP)':34}{ours['matmul_gflop']:12.0f}"
        + (
            f"{ref['matmul_gflop']:14.0f}"
            f"{ref['matmul_gflop'] / ours['matmul_gflop']:10.2f} (ref/ours)"
            if ref
            else ""
        ),
        f"{'slot occupancy':34}{ours['slot_occupancy']:12.2f}",
        f"{'warm-up incl. compile (s)':34}{ours['warmup_s']:12.2f}",
        f"{'compilations':34}{ours['num_compilations']:12d}"
        f"  ({ours['num_compilations_after_warmup']} after warm-up)",
        f"{'achieved bandwidth (GB/s)':34}{ours['achieved_bandwidth_gbps']:12.2f}"
        f"  of {result['peak_bandwidth_gbps']:.1f} peak"
        f" ({result['peak_bandwidth_source']}):"
        f" {100 * ours['fraction_of_peak_bandwidth']:.1f}%",
        f"{'useful bandwidth (GB/s)':34}{ours['useful_bandwidth_gbps']:12.2f}"
        f"  (weights once per decode step; {ours['tile_steps']} tile steps"
        f" in {ours['decode_steps']} decode steps)",
        f"{'peak memory':34}{ours['peak_memory_bytes'] / 2**20:10.0f} MiB"
        f" ({ours['peak_memory_source']})",
        f"{'phases (s, share of wall)':34}"
        + ", ".join(
            f"{name} {secs:.2f} ({secs / ours['wall_s']:.0%})"
            for name, secs in ours["phase_seconds"].items()
        ),
    ]
    if result["agreement"]:
        a = result["agreement"]
        lines.append(
            f"rows identical to transformers ({a['dtype']}):"
            f" {a['identical_rows_fraction']:.3f}"
        )
    if result["batch_invariance"]:
        b = result["batch_invariance"]
        lines.append(
            f"rows bitwise identical, batch {b['batch_sizes'][0]} vs"
            f" {b['batch_sizes'][1]} ({b['dtype']}, row tile {b['row_tile']}):"
            f" tokens {b['identical_tokens_fraction']:.4f}, tokens and logprob"
            f" {b['identical_tokens_and_logprob_fraction']:.4f}"
        )
    if result["cross_process_invariance"]:
        c = result["cross_process_invariance"]
        lines.append(
            f"rows bitwise identical to another process's, batch"
            f" {c['batch_sizes'][0]} vs {c['batch_sizes'][1]} (programs compiled"
            f" in each): tokens and logprob"
            f" {c['identical_tokens_and_logprob_fraction']:.4f}"
        )
    return "\n".join(lines)
