"""Run in a subprocess with 8 host CPU devices (XLA_FLAGS must be set before
jax is imported): prints greedy and sampled completions per mesh as JSON,
and what JAX compiled in `Sampler.compile` and for the greedy call after
it."""

import json
import sys

import jax
import jax.numpy as jnp
from sampling.test_sampler import (
    GREEDY,
    PROMPTS,
    SAMPLED,
    IdTokenizer,
    count_compile_events,
)

from gsm8k_jax.models.gemma3.params import load_hf_model
from gsm8k_jax.models.gemma3.sharding import make_mesh
from gsm8k_jax.sampling.decode import DecodeState
from gsm8k_jax.sampling.sampler import Sampler

model_dir = sys.argv[1]
assert jax.device_count() == 8, jax.devices()
results = {}
for name, mesh in [
    ("single", None),
    ("data8", make_mesh(data=8, model=1)),
    ("data4_model2", make_mesh(data=4, model=2)),
    ("data2_model4", make_mesh(data=2, model=4)),
]:
    model = load_hf_model(model_dir, dtype=jnp.float32)
    sampler = Sampler(model, IdTokenizer(), mesh=mesh)
    with count_compile_events() as compiled:
        sampler.compile(PROMPTS[:16], GREEDY, batch_size=8)
    results[name] = {"compiled_by_compile": dict(compiled)}
    for kind, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
        with count_compile_events() as compiled:
            completions = sampler.generate(PROMPTS[:16], params, batch_size=8)
        results[name][kind] = [c.tokens for c in completions]
        if kind == "greedy":
            results[name]["compiled_after_compile"] = dict(compiled)
    # The empty decode state as the sampler makes it: each device's share of
    # 16 slots' keys ([slots, length, kv heads, head dim]).
    state = DecodeState.empty(model, 16, 32, 8, 0, sampler.prefill_chunk, mesh)
    shards = state.cache.k[0].addressable_shards
    results[name]["kv_shard_shapes"] = sorted({s.data.shape for s in shards})
    kernel = model.layers[0].mlp.gate_proj.kernel[...]
    results[name]["gate_proj_spec"] = str(kernel.sharding.spec) if mesh else None
print(json.dumps(results))
