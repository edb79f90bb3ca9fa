"""Run in a subprocess with 8 host CPU devices (XLA_FLAGS must be set before
jax is imported): loads a model straight onto meshes, merges LoRA there and
sweeps checkpoints over device groups; prints what it measured as JSON.

argv: the random HF model folder (16 heads, 8 kv heads), a scratch folder.
"""

import dataclasses
import functools
import gc
import json
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from lora_checkpoints import random_factors, write_tunix_checkpoint
from safetensors import safe_open
from sampling.test_sampler import GREEDY, IdTokenizer

from gsm8k_jax.checkpoints import lora as lora_lib
from gsm8k_jax.checkpoints import lora_merge, lora_targets
from gsm8k_jax.checkpoints.lora_config import DEFAULT_MODULE_PATH
from gsm8k_jax.compilation_cache import enable_compilation_cache
from gsm8k_jax.eval.data import load_gsm8k
from gsm8k_jax.eval.results import RunFiles
from gsm8k_jax.eval.runner import EvalConfig, evaluate
from gsm8k_jax.eval.sweep import evaluate_checkpoints
from gsm8k_jax.models.gemma3 import params as params_lib
from gsm8k_jax.models.gemma3.sharding import make_mesh, shard_model
from gsm8k_jax.models.registry import load_pretrained
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

model_dir, scratch = Path(sys.argv[1]), Path(sys.argv[2])
assert jax.device_count() == 8, jax.devices()
# Each single run's sampler, and each device group's, compiles what the one
# before it compiled (a Sampler's programs are its own): read them from disk.
enable_compilation_cache(scratch / "jax_cache")
DEVICES = jax.devices()
results = {}


# ----------------------------------------------------------------------------
# Bytes per device, sampled from the live arrays after every placement step.
# ----------------------------------------------------------------------------


def bytes_per_device() -> list[int]:
    held = dict.fromkeys(DEVICES, 0)
    for array in jax.live_arrays():
        shard = np.prod(array.sharding.shard_shape(array.shape), dtype=np.int64)
        for device in array.sharding.device_set:
            held[device] += int(shard) * array.dtype.itemsize
    return [held[d] for d in DEVICES]


class PeakMeter:
    """The most bytes each device held above `start()`, over the samples."""

    def start(self):
        self.base, self.peak, self.samples = bytes_per_device(), [0] * 8, 0

    def sample(self):
        now = bytes_per_device()
        self.peak = [max(p, n - b) for p, n, b in zip(self.peak, now, self.base)]
        self.samples += 1


meter = PeakMeter()


def sampled_after(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        meter.sample()
        return out

    return wrapped


params_lib._place_tensor = sampled_after(params_lib._place_tensor)
lora_merge._merge_weight = sampled_after(lora_merge._merge_weight)

# The bound, from the file alone: every 2-D tensor split 8 ways (all their
# split dimensions divide by 8 here), the 1-D norms whole on every device.
with safe_open(model_dir / "model.safetensors", framework="numpy") as f:
    # safe_open has keys() but cannot be iterated.
    shapes = [f.get_slice(name).get_shape() for name in f.keys()]  # noqa: SIM118
F32 = 4
results["whole_model_bytes"] = sum(int(np.prod(s)) * F32 for s in shapes)
results["bound_bytes"] = sum(
    int(np.prod(s)) * F32 // (8 if len(s) > 1 else 1) for s in shapes
)

mesh = make_mesh(data=1, model=8)
meter.start()
model = params_lib.load_hf_model(model_dir, dtype=jnp.float32, mesh=mesh)
results["sharded_load"] = {"peak": meter.peak, "samples": meter.samples}

hf_config = transformers.AutoConfig.from_pretrained(model_dir)
RANK = 4
write_tunix_checkpoint(
    scratch / "lora" / "actor" / "1" / "model_params",
    random_factors(hf_config, RANK, seed=1),
)
factors_bytes = sum(
    a.nbytes + b.nbytes for a, b in random_factors(hf_config, RANK, seed=1).values()
)
targets = lora_targets.weight_targets(model, DEFAULT_MODULE_PATH)
merged_bytes = sum(t.variable.get_value().nbytes for t in targets.values())
# Above the loaded model: at most every merged (float32) weight's 1/8 beside
# its base, and every factor whole. One whole merged weight on a device
# would add 8x its share.
results["merge_bound_bytes"] = factors_bytes + merged_bytes // 8
specs_before = {path: t.variable.get_value().sharding for path, t in targets.items()}
meter.start()
lora_lib.load_lora(
    model, scratch / "lora" / "actor", lora_lib.LoraConfig(rank=RANK), merge=True
)
results["sharded_merge"] = {"peak": meter.peak, "samples": meter.samples}
targets = lora_targets.weight_targets(model, DEFAULT_MODULE_PATH)
results["merge_kept_shardings"] = all(
    t.variable.get_value().sharding == specs_before[path]
    and t.variable.get_value().dtype == jnp.float32
    for path, t in targets.items()
)
results["merged_q_spec"] = str(model.layers[0].attn.q_einsum.w[...].sharding.spec)
del model, targets
gc.collect()


def merged_in_float32_where_split(model) -> bool:
    """Merges the LoRA checkpoint; every merged weight must be float32 and
    keep its base weight's sharding."""
    before = {
        path: t.variable.get_value().sharding
        for path, t in lora_targets.weight_targets(model, DEFAULT_MODULE_PATH).items()
    }
    lora_lib.load_lora(
        model, scratch / "lora" / "actor", lora_lib.LoraConfig(rank=RANK), merge=True
    )
    after = lora_targets.weight_targets(model, DEFAULT_MODULE_PATH)
    return after.keys() == before.keys() and all(
        t.variable.get_value().sharding == before[path]
        and t.variable.get_value().dtype == jnp.float32
        for path, t in after.items()
    )


def attached_beside_the_blocks(model) -> bool:
    """Attaches the LoRA checkpoint; every weight must keep its array, and
    every factor be split as its weight's axes of the same letter."""
    before = {
        path: t.variable.get_value()
        for path, t in lora_targets.weight_targets(model, DEFAULT_MODULE_PATH).items()
    }
    lora_lib.load_lora(
        model, scratch / "lora" / "actor", lora_lib.LoraConfig(rank=RANK)
    )
    placed = []
    for path, t in lora_targets.weight_targets(model, DEFAULT_MODULE_PATH).items():
        adapter = t.layer.lora
        w = t.variable.get_value()
        a_sharding, b_sharding = t.factor_shardings(w.sharding)
        placed.append(
            w is before[path]
            and adapter.a[...].sharding == a_sharding
            and adapter.b[...].sharding == b_sharding
        )
    return len(placed) == len(before) and all(placed)


# The default dtype: merged weights go from bfloat16 to float32, still split;
# attached factors sit beside the bfloat16 weights' blocks.
bf16_model = params_lib.load_hf_model(model_dir, dtype=jnp.bfloat16, mesh=mesh)
results["bfloat16_attached_beside_blocks"] = attached_beside_the_blocks(bf16_model)
lora_lib.detach_lora(bf16_model)
results["bfloat16_merge_kept_shardings"] = merged_in_float32_where_split(bf16_model)
del bf16_model
gc.collect()

# The control: today's load then shard, measured the same way.
meter.start()
model = params_lib.load_hf_model(model_dir, dtype=jnp.float32)
shard_model(model, mesh)
meter.sample()
results["load_then_shard"] = {"peak": meter.peak, "samples": meter.samples}
del model
gc.collect()

# ----------------------------------------------------------------------------
# Sharded loads give today's weights, logits and tokens.
# ----------------------------------------------------------------------------


def weights(model):
    return {
        "/".join(map(str, p)): v.get_value()
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):  # [B, T] -> [B, T, V]
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model(tokens, positions, jnp.ones(tokens.shape, bool))
    return model.logits(hidden)


def forward_logits(model):
    tokens = np.random.default_rng(0).integers(3, 4096, (2, 12), dtype=np.int32)
    return np.asarray(_logits(*nnx.split(model), tokens), np.float32)


def generate(model, mesh):
    sampler = Sampler(model, IdTokenizer(), mesh=mesh)
    completions = sampler.generate(PROMPTS, SHORT, batch_size=8)
    return [c.tokens for c in completions], [c.logprob for c in completions]


SHORT = dataclasses.replace(GREEDY, max_generation_steps=8)
# One prompt bucket: one prefill program per sampler.
PROMPTS = [[2, *range(10, 10 + n)] for n in (4, 9, 5, 11, 6, 7, 3, 8)]
parity = {}
# (dtype, meshes whose outputs are compared, meshes whose weights only are).
for dtype, run_on, weights_on in (
    ("float32", [(2, 4)], []),
    ("bfloat16", [(8, 1)], [(1, 8), (2, 4)]),
):
    single = params_lib.load_hf_model(model_dir, dtype=jnp.dtype(dtype))
    single_weights = {k: np.asarray(v) for k, v in weights(single).items()}
    single_logits = forward_logits(single)
    single_tokens, single_logprobs = generate(single, None)
    for data, model_axis in run_on + weights_on:
        mesh = make_mesh(data=data, model=model_axis)
        sharded = params_lib.load_hf_model(model_dir, dtype=jnp.dtype(dtype), mesh=mesh)
        old = params_lib.load_hf_model(model_dir, dtype=jnp.dtype(dtype))
        shard_model(old, mesh)
        sharded_weights, old_weights = weights(sharded), weights(old)
        checks = {
            "weights_equal_single": all(
                np.array_equal(np.asarray(v), single_weights[k])
                and v.dtype == single_weights[k].dtype
                for k, v in sharded_weights.items()
            ),
            "shardings_equal_load_then_shard": all(
                v.sharding == old_weights[k].sharding
                for k, v in sharded_weights.items()
            ),
            "split_weights": sum(
                any(s is not None for s in v.sharding.spec)
                for v in sharded_weights.values()
            ),
        }
        if (data, model_axis) in run_on:
            logits = forward_logits(sharded)
            tokens, logprobs = generate(sharded, mesh)
            checks |= {
                "logits_max_abs_diff": float(np.max(np.abs(logits - single_logits))),
                "logits_equal": bool(np.array_equal(logits, single_logits)),
                "tokens_equal": tokens == single_tokens,
                "logprobs_equal": logprobs == single_logprobs,
            }
        parity[f"{dtype}_data{data}_model{model_axis}"] = checks
results["parity"] = parity

# ----------------------------------------------------------------------------
# A sweep of 3 checkpoints over 2 groups of 4 devices == 3 single runs.
# ----------------------------------------------------------------------------

checkpoints = []
for seed in (1, 2, 3):
    root = scratch / f"ckpt{seed}"
    factors = {
        key: (a, b * 0.5)
        for key, (a, b) in random_factors(hf_config, RANK, seed).items()
    }
    write_tunix_checkpoint(root / "actor" / "100" / "model_params", factors)
    checkpoints.append(str(root / "actor"))
lora_config = lora_lib.LoraConfig(rank=RANK, alpha=4.0)
eval_config = EvalConfig(batch_size=2, sampling=SamplingParams(max_generation_steps=12))
examples = load_gsm8k()[:2]

singles = []
for i, path in enumerate(checkpoints):
    model, tokenizer, _ = load_pretrained("gemma3-tiny", model_dir)
    lora_lib.load_lora(model, path, lora_config)
    files = RunFiles(scratch / "single", f"single{i}")
    files.prepare({}, resume=False, overwrite=True)
    evaluate(
        Sampler(model, tokenizer),
        examples,
        eval_config,
        files,
        run_info={},
        show_progress=False,
    )
    singles.append(files.read_rollouts())

placed_on = {}


def recording_load_lora(model, path, config):
    """load_lora, noting which thread attached `path` onto which devices."""
    out = lora_lib.load_lora(model, path, config)
    devices = model.layers[0].mlp.gate_proj.lora.a[...].sharding.device_set
    placed_on[path] = (threading.current_thread().name, sorted(d.id for d in devices))
    return out


runs = evaluate_checkpoints(
    "gemma3-tiny",
    str(model_dir),
    checkpoints,
    lora_config,
    eval_config,
    scratch / "sweep",
    include_base=False,
    num_examples=len(examples),
    show_progress=False,
    load_lora_fn=recording_load_lora,
    devices_per_checkpoint=4,
)
results["sweep"] = {
    "rollouts": [run.rollouts for run in runs],
    "singles": singles,
    "placed_on": sorted(placed_on.values()),
}
print(json.dumps(results))
