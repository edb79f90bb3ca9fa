"""Sampler throughput against transformers' `generate`, on the same weights.

One process builds random Gemma 3 weights once (a transformers
`Gemma3ForCausalLM`, saved with `save_pretrained` and read back by our
`load_hf_model`, so both sides hold identical numbers), makes one left-padded
batch of random prompts, and times:

- ours: `Sampler.generate` (host side included) with a budget of N steps and
  with a budget of 1 step (prefill only), after a first, compiling call;
- the reference: `Gemma3ForCausalLM.generate` with `max_new_tokens` N and 1,
  greedy, under `torch.inference_mode()`.

Both sides always generate exactly N tokens per row: our eos id is one past
the vocabulary (argmax can never pick it), and the reference has no eos id at
all (`min_new_tokens=N` on top). Definitions, identical for both sides:

- prefill tokens/s = B * prompt_len / t(N=1)    (B rows of the padded width);
- decode tokens/s  = B * (N - 1) / (t(N) - t(N=1));
- generation tokens/s = B * N / t(N)            (the headline figure).
  Our decode loop also runs the model on the last chosen token, a forward
  pass the reference skips: it counts in our t(1), so in our prefill figure;
- ours' compile time = first call - steady-state call (for each of the two
  shapes, summed); steady-state times are the best (minimum) of `repeats`
  calls: other processes on a shared machine only ever add time, and torch's
  spinning threads slow down many-fold when a core is taken, so the minimum
  is the least disturbed estimate (every call's time is kept in the result).

Greedy agreement (fraction of rows whose N tokens are identical) is a
correctness sanity figure: it is expected to be 1.0 in float32 only.

For large named configs pass `skip_reference`: our model is then initialised
directly with random weights (no torch allocation at all).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from gsm8k_jax.benchmarks.models import (
    DTYPES,
    IdTokenizer,
    build_model,
    left_pad,
    load_reference,
    reference_device,
)
from gsm8k_jax.models.gemma3.config import CONFIGS
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.params import BOS_ID, PAD_ID
from gsm8k_jax.sampling.batching import (
    default_prefill_chunk,
    default_row_tile,
    round_up,
)
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

FIRST_PROMPT_ID = 3  # prompt tokens are drawn from [3, vocab): no pad, eos or bos


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """What to benchmark.

    model: "hf-tiny", a key of `CONFIGS` (e.g. "gemma3-1b"), or a dict of
      `transformers.Gemma3TextConfig` keyword arguments (tests use this for
      very small models).
    """

    model: str | dict[str, Any] = "hf-tiny"
    batch_size: int = 8
    prompt_len: int = 128
    max_generation_steps: int = 128
    dtype: str = "float32"
    repeats: int = 3
    skip_reference: bool = False
    seed: int = 0
    row_tile: int | None = None  # decode tile; None: the platform's

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}."
            )
        if (
            isinstance(self.model, str)
            and self.model != "hf-tiny"
            and (self.model not in CONFIGS)
        ):
            raise ValueError(
                f"Unknown model {self.model!r}: use 'hf-tiny' or one of {sorted(CONFIGS)}."
            )
        if self.max_generation_steps < 2:
            raise ValueError("max_generation_steps must be >= 2 to time decoding.")
        if self.prompt_len < 1 or self.batch_size < 1 or self.repeats < 1:
            raise ValueError("prompt_len, batch_size and repeats must be >= 1.")
        if self.row_tile is not None and self.row_tile < 1:
            raise ValueError(f"row_tile must be >= 1, got {self.row_tile}.")

    @property
    def model_name(self) -> str:
        return self.model if isinstance(self.model, str) else "custom-hf"


@dataclasses.dataclass
class SideResult:
    """Timings of one implementation. Times in seconds; steady state is the
    best of `repeats` calls."""

    name: str
    first_full_s: float  # first call with the full budget (ours: includes compile)
    first_prefill_s: float  # first call with a budget of one token
    full_s: float  # steady state, full budget
    prefill_s: float  # steady state, one token
    full_times_s: list[float]
    prefill_times_s: list[float]
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    generation_tokens_per_s: float
    compile_s: float | None  # ours only: first calls minus steady state
    num_compilations: int | None  # ours only, after every call
    # Ours only: compilations after the two first calls; equal to the above
    # when steady-state calls reuse the compiled programs.
    num_compilations_after_warmup: int | None
    total_wall_s: float  # everything this side ran, warm-up included
    peak_memory_bytes: int
    # "device": the accelerator's peak bytes in use. "process_max_rss": the
    # process's high-water mark so far (cumulative: it includes building the
    # random weights, and for the reference everything ours used before).
    peak_memory_source: str


# ----------------------------------------------------------------------------
# Prompts.


def random_prompts(
    batch_size: int, prompt_len: int, vocab_size: int, seed: int = 0
) -> list[list[int]]:
    """bos + random ids; row 0 is exactly prompt_len long, others are shorter
    (between half and all of it), so every row but one is left-padded."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, size=batch_size)
    lengths[0] = prompt_len
    return [
        [BOS_ID, *rng.integers(FIRST_PROMPT_ID, vocab_size, size=n - 1).tolist()][:n]
        for n in lengths
    ]


# ----------------------------------------------------------------------------
# Timing.


def peak_memory() -> tuple[int, str]:
    """Peak device bytes when the backend reports them, else the process max RSS."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    # Linux reports kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _time_side(
    name: str,
    run: Callable[[int], np.ndarray],
    cfg: BenchmarkConfig,
    num_compilations: Callable[[], int] | None = None,
) -> tuple[SideResult, np.ndarray]:
    """Times `run(steps)` (which returns [B, steps] tokens) at N and 1 steps."""
    n, b = cfg.max_generation_steps, cfg.batch_size
    wall_start = time.perf_counter()
    first_full, tokens = _timed(lambda: run(n))
    first_prefill, _ = _timed(lambda: run(1))
    after_warmup = num_compilations() if num_compilations else None
    full_times, prefill_times = [], []
    for _ in range(cfg.repeats):
        full_times.append(_timed(lambda: run(n))[0])
        prefill_times.append(_timed(lambda: run(1))[0])
    total_wall = time.perf_counter() - wall_start
    full, prefill = min(full_times), min(prefill_times)
    memory, memory_source = peak_memory()
    compiled = num_compilations is not None
    result = SideResult(
        name=name,
        first_full_s=first_full,
        first_prefill_s=first_prefill,
        full_s=full,
        prefill_s=prefill,
        full_times_s=full_times,
        prefill_times_s=prefill_times,
        prefill_tokens_per_s=b * cfg.prompt_len / prefill,
        # Clamped: with very few steps noise can make t(N) <= t(1).
        decode_tokens_per_s=b * (n - 1) / max(full - prefill, 1e-9),
        generation_tokens_per_s=b * n / full,
        compile_s=(first_full - full) + (first_prefill - prefill) if compiled else None,
        num_compilations=num_compilations() if compiled else None,
        num_compilations_after_warmup=after_warmup,
        total_wall_s=total_wall,
        peak_memory_bytes=memory,
        peak_memory_source=memory_source,
    )
    return result, tokens


def _ours_runner(
    model: Gemma3, prompts: list[list[int]], vocab_size: int, row_tile: int | None
) -> tuple[Callable[[int], np.ndarray], Callable[[], int]]:
    """`run(steps)` -> [B, steps] tokens, and the sampler's compilation count."""
    sampler = Sampler(model, IdTokenizer(), row_tile=row_tile)
    # One past the vocabulary: argmax never picks it, so every row runs the
    # full budget (SamplingParams only checks how many eos ids there are).
    never = (vocab_size,)

    def run(steps: int) -> np.ndarray:
        params = SamplingParams(max_generation_steps=steps, eos_ids=never)
        out = sampler.generate(prompts, params)
        assert all(c.num_tokens == steps for c in out), "an eos fired"
        return np.array([c.tokens for c in out])

    return run, lambda: sampler.num_compilations


def _reference_runner(
    model_dir: str, prompts: list[list[int]], cfg: BenchmarkConfig
) -> Callable[[int], np.ndarray]:
    import torch

    model = load_reference(model_dir, cfg.dtype)
    model.generation_config.eos_token_id = None
    width = max(map(len, prompts))
    ids, mask = left_pad(prompts, width)
    device = reference_device()
    ids_t, mask_t = torch.tensor(ids, device=device), torch.tensor(mask, device=device)

    def run(steps: int) -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids_t,
                attention_mask=mask_t,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                pad_token_id=PAD_ID,
            )
        tokens = out[:, width:].cpu().numpy()
        assert tokens.shape == (len(prompts), steps), tokens.shape
        return tokens

    return run


# ----------------------------------------------------------------------------
# The benchmark.


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Runs ours (and the reference unless `cfg.skip_reference`); returns a
    JSON-ready dict: settings, one entry per side, ratios and agreement."""
    dtype = DTYPES[cfg.dtype]
    start = time.perf_counter()
    # Other processes on the machine skew CPU timings (torch's threads most):
    # the load averages are recorded to tell a quiet run from a contended one.
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as model_dir:
        model = build_model(
            cfg.model, dtype, cfg.seed, model_dir, with_reference=not cfg.skip_reference
        )
        config = model.config
        setup_s = time.perf_counter() - start

        prompts = random_prompts(
            cfg.batch_size, cfg.prompt_len, config.vocab_size, cfg.seed
        )
        run_ours, num_compilations = _ours_runner(
            model, prompts, config.vocab_size, cfg.row_tile
        )
        ours, our_tokens = _time_side("ours", run_ours, cfg, num_compilations)
        # Free our weights and cache before the reference runs.
        del run_ours, num_compilations, model
        gc.collect()

        reference = agreement = None
        if not cfg.skip_reference:
            run_ref = _reference_runner(model_dir, prompts, cfg)
            reference, ref_tokens = _time_side("transformers", run_ref, cfg)
            same_rows = np.all(our_tokens == ref_tokens, axis=1)
            # Length of the common prefix of each row, as a fraction of N.
            differs = our_tokens != ref_tokens
            prefix = np.where(
                differs.any(axis=1), differs.argmax(axis=1), differs.shape[1]
            )
            agreement = {
                "dtype": cfg.dtype,
                "identical_rows_fraction": float(same_rows.mean()),
                "mean_common_prefix_fraction": float(prefix.mean() / differs.shape[1]),
            }

    result: dict[str, Any] = {
        "settings": dataclasses.asdict(cfg) | {"model": cfg.model_name},
        "row_tile": cfg.row_tile or default_row_tile(),
        "model": {
            "num_layers": config.num_layers,
            "embed_dim": config.embed_dim,
            "hidden_dim": config.hidden_dim,
            "num_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "vocab_size": config.vocab_size,
            "sliding_window": config.sliding_window,
        },
        "environment": {
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "our_padded_prompt": round_up(cfg.prompt_len, default_prefill_chunk()),
        "setup_s": setup_s,
        "ours": dataclasses.asdict(ours),
        "reference": dataclasses.asdict(reference) if reference else None,
        "agreement": agreement,
        "ratios": None,
    }
    if reference:
        result["environment"]["torch_threads"] = _torch_threads()
        result["ratios"] = {
            key: getattr(ours, key) / getattr(reference, key)
            for key in (
                "generation_tokens_per_s",
                "prefill_tokens_per_s",
                "decode_tokens_per_s",
            )
        }
    return result


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def format_table(result: dict[str, Any]) -> str:
    """A plain-text summary of `run_benchmark`'s result."""
    s, ours, ref = result["settings"], result["ours"], result["reference"]
    lines = [
        (
            f"model={s['model']} dtype={s['dtype']} batch={s['batch_size']}"
            f" prompt_len={s['prompt_len']} (ours padded to {result['our_padded_prompt']})"
            f" steps={s['max_generation_steps']} repeats={s['repeats']}"
            f" row_tile={result['row_tile']}"
            f" backend={result['environment']['backend']}"
            f" load avg {result['environment']['loadavg_start'][0]:.1f}"
            f" -> {result['environment']['loadavg_end'][0]:.1f}"
        ),
        "",
        f"{'':28}{'ours':>14}{'transformers':>14}{'ours/ref':>10}",
    ]

    def row(label: str, key: str, fmt: str = "{:14.1f}", ratio: bool = True) -> None:
        a = ours[key]
        b = ref[key] if ref else None
        cells = fmt.format(a) if a is not None else f"{'-':>14}"
        cells += fmt.format(b) if b is not None else f"{'-':>14}"
        cells += f"{a / b:10.2f}" if ratio and a is not None and b else ""
        lines.append(f"{label:28}{cells}")

    row("generation tokens/s", "generation_tokens_per_s")
    row("prefill tokens/s", "prefill_tokens_per_s")
    row("decode tokens/s", "decode_tokens_per_s")
    row("steady full call (s)", "full_s", "{:14.3f}", ratio=False)
    row("steady prefill call (s)", "prefill_s", "{:14.3f}", ratio=False)
    row("first full call (s)", "first_full_s", "{:14.3f}", ratio=False)
    row("compile (s)", "compile_s", "{:14.3f}", ratio=False)
    row("total wall (s)", "total_wall_s", "{:14.3f}", ratio=False)
    lines.append(
        f"{'compilations':28}{ours['num_compilations']:>14}"
        f"  ({ours['num_compilations_after_warmup']} after the first calls)"
    )
    mib = lambda side: (
        f"{side['peak_memory_bytes'] / 2**20:.0f} MiB ({side['peak_memory_source']})"
    )
    lines.append(f"{'peak memory, ours':28}{mib(ours):>14}")
    if ref:
        lines.append(f"{'peak memory, after ref':28}{mib(ref):>14}")
    if result["agreement"]:
        a = result["agreement"]
        lines.append(
            f"greedy agreement ({a['dtype']}): identical rows"
            f" {a['identical_rows_fraction']:.3f}, mean common prefix"
            f" {a['mean_common_prefix_fraction']:.3f}"
        )
    return "\n".join(lines)
