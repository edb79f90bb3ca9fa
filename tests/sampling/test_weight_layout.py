"""Decoding with the attention weights laid out ahead of the loop
(`sampling.weight_layout`): the same results, without in-loop weight copies."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import make_tiny_hf_model

from gsm8k_jax.models.gemma3.params import load_hf_model
from gsm8k_jax.sampling.decode import DecodeSettings, DecodeState, decode, prefill

ROWS, WIDTH, STEPS, ROW_TILE = 8, 32, 12, 4
# Attention sizes that no other array of the decode program has (rows, tile,
# width, steps, key block, vocabulary), so counting arrays of the weights'
# shapes counts the weights.
ATTENTION_SIZES = {
    "hidden_size": 72,
    "head_dim": 24,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_hf_model(path, **ATTENTION_SIZES)
    return path


def prefilled(model):
    """A decode state with ROWS random prompts of different lengths, each
    prefilled as one chunk of WIDTH tokens."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, WIDTH + 1, size=ROWS)
    pads = WIDTH - lengths
    valid = np.arange(WIDTH)[None, :] >= pads[:, None]
    tokens = np.where(valid, rng.integers(3, 200, size=(ROWS, WIDTH)), 0)
    ids = jnp.arange(ROWS)
    state = DecodeState.empty(model, ROWS, WIDTH, STEPS, pad_id=0, chunk=WIDTH)
    graphdef, params = nnx.split(model)
    return prefill(
        graphdef, params, state, tokens, pads, ids * 0, ids >= 0, ids, 7, ids,
        ids * 0, jnp.full((ROWS,), STEPS), pad_id=0,
    )  # fmt: skip


def decoder(model, arrange_weights):
    graphdef, params = nnx.split(model)
    run = jax.jit(
        functools.partial(
            decode,
            graphdef,
            pad_id=0,
            row_tile=ROW_TILE,
            arrange_weights=arrange_weights,
        )
    )
    return params, run


def settings(temperature):
    return DecodeSettings(
        eos_ids=jnp.array([1], jnp.int32),
        temperature=jnp.float32(temperature),
        top_k=jnp.int32(0 if temperature == 0 else 50),
        top_p=jnp.float32(1.0 if temperature == 0 else 0.9),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_arranged_weights_decode_the_same_bits(tiny_path, dtype, temperature):
    """Every array of the decoded state (tokens, log-probabilities, the
    cache) is the same to the bit with the weights arranged as without."""
    model = load_hf_model(tiny_path, dtype=dtype)
    state = prefilled(model)
    results = []
    for arrange in (False, True):
        params, run = decoder(model, arrange)
        results.append(run(params, state, settings(temperature), jnp.int32(ROWS)))
    plain, arranged = results
    assert int(plain.num_tokens.sum()) > ROWS  # it decoded
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(arranged), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def in_loop_copies(compiled_text, shapes):
    """How many copies and transposes run inside the program's while loops
    (in their bodies or in computations those call, branches included) and
    produce an array of one of `shapes`, in any axis order."""
    computations = {
        m.group(1): m.group(2)
        for m in re.finditer(
            r"\n%([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", compiled_text, re.S
        )
    }

    def callees(text):
        named = r"(?:calls|to_apply|body|condition|true_computation|false_computation)"
        branches = re.findall(r"branch_computations=\{([^}]*)\}", text)
        return re.findall(named + r"=%([\w.\-]+)", text) + [
            name for group in branches for name in re.findall(r"%([\w.\-]+)", group)
        ]

    in_loop, todo = set(), re.findall(r"body=%([\w.\-]+)", compiled_text)
    while todo:
        name = todo.pop()
        if name not in in_loop and name in computations:
            in_loop.add(name)
            todo += callees(computations[name])
    wanted = {tuple(sorted(s)) for s in shapes}
    return sum(
        tuple(sorted(int(d) for d in dims.split(","))) in wanted
        for name in in_loop
        for dims in re.findall(
            r"= \w+\[([\d,]+)\]\{[^}]*\} (?:copy|transpose)\(", computations[name]
        )
    )


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the in-loop copies are XLA:CPU's"
)
def test_float32_decode_copies_no_attention_weight_in_its_loop(tiny_path):
    """XLA:CPU copies every attention weight of a float32 model at every
    decode step unless the weights are arranged ahead of the loop: q and
    attn_vec (one shape up to axis order) and kv, each checked."""
    model = load_hf_model(tiny_path, dtype=jnp.float32)
    attn = model.layers[0].attn
    weights = {
        "q, attn_vec": [attn.q_einsum.w.shape, attn.attn_vec_einsum.w.shape],
        "kv": [attn.kv_einsum.w.shape],
    }
    state = prefilled(model)
    copies = {}
    for arrange in (False, True):
        params, run = decoder(model, arrange)
        text = run.lower(params, state, settings(0.0), jnp.int32(ROWS)).compile()
        for name, shapes in weights.items():
            copies[name, arrange] = in_loop_copies(text.as_text(), shapes)
    num_layers = len(model.layers)
    assert copies["q, attn_vec", False] >= 2 * num_layers, copies
    assert copies["kv", False] >= num_layers, copies
    assert copies["q, attn_vec", True] == copies["kv", True] == 0, copies
