"""Prefill and decode on attention weights laid out ahead of the programs
(`sampling.weight_layout`): the same results, without the programs' weight
copies."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import make_tiny_hf_model

from gsm8k_jax.models.gemma3.params import load_hf_model
from gsm8k_jax.sampling import weight_layout
from gsm8k_jax.sampling.decode import DecodeState, decode, decode_settings, prefill
from gsm8k_jax.sampling.params import SamplingParams

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


def prefill_args(model):
    """An empty decode state and ROWS random prompts of different lengths,
    each to be prefilled as one chunk of WIDTH tokens."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, WIDTH + 1, size=ROWS)
    pads = WIDTH - lengths
    valid = np.arange(WIDTH)[None, :] >= pads[:, None]
    tokens = np.where(valid, rng.integers(3, 200, size=(ROWS, WIDTH)), 0)
    ids = jnp.arange(ROWS)
    state = DecodeState.empty(model, ROWS, WIDTH, STEPS, pad_id=0, chunk=WIDTH)
    return (
        state, tokens, pads, ids * 0, ids >= 0, ids, 7, ids, ids * 0,
        jnp.full((ROWS,), STEPS),
    )  # fmt: skip


def program_weights(model, arranged):
    graphdef, params = nnx.split(model)
    return graphdef, weight_layout.arrange(params) if arranged else params


def prefiller(model, arranged):
    graphdef, params = program_weights(model, arranged)
    run = jax.jit(functools.partial(prefill, graphdef, pad_id=0, arranged=arranged))
    return params, run


def prefilled(model):
    """A decode state with the prompts of `prefill_args` prefilled."""
    params, run = prefiller(model, arranged=False)
    return run(params, *prefill_args(model))


def decoder(model, arranged):
    graphdef, params = program_weights(model, arranged)
    run = jax.jit(
        functools.partial(
            decode, graphdef, pad_id=0, row_tile=ROW_TILE, arranged=arranged
        )
    )
    return params, run


def assert_same_bits(a_tree, b_tree):
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def settings(temperature):
    return decode_settings(
        SamplingParams(
            temperature=temperature,
            top_k=0 if temperature == 0 else 50,
            top_p=1.0 if temperature == 0 else 0.9,
            eos_ids=(1,),
        )
    )


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_arranged_weights_decode_the_same_bits(tiny_path, temperature):
    """Every array of the decoded state (tokens, log-probabilities, the
    cache) is the same to the bit with the weights arranged as without
    (float32: bfloat16 weights are not arranged, tested below)."""
    model = load_hf_model(tiny_path, dtype=jnp.float32)
    state = prefilled(model)
    results = []
    for arranged in (False, True):
        params, run = decoder(model, arranged)
        results.append(run(params, state, settings(temperature), jnp.int32(ROWS)))
    plain, arranged = results
    assert int(plain.num_tokens.sum()) > ROWS  # it decoded
    assert_same_bits(plain, arranged)


def test_arranged_weights_prefill_the_same_bits(tiny_path):
    """Every array of the prefilled state (the cache, the last hidden
    states) is the same to the bit with the weights arranged as without,
    for a first chunk and for a second one that attends over the first."""
    model = load_hf_model(tiny_path, dtype=jnp.float32)
    state, tokens, pads, chunk_index, last, *rest = prefill_args(model)
    results = []
    for arranged in (False, True):
        params, run = prefiller(model, arranged)
        first = run(params, state, tokens, pads * 0, chunk_index, ~last, *rest)
        second = run(
            params, first, tokens[:, ::-1], pads * 0, chunk_index + 1, last, *rest
        )
        results.append((first, second))
    plain, arranged = results
    assert bool(jnp.any(plain[1].hidden != 0))  # it prefilled
    assert_same_bits(plain, arranged)


def test_only_float32_attention_weights_are_arranged(tiny_path):
    """Arranging moves the float32 attention weights alone (every other
    leaf is the same array), and leaves a bfloat16 model as it is."""
    for dtype in (jnp.float32, jnp.bfloat16):
        params = nnx.state(load_hf_model(tiny_path, dtype=dtype))
        arranged = weight_layout.arrange(params)
        paths = lambda tree: {
            jax.tree_util.keystr(path): x
            for path, x in jax.tree_util.tree_leaves_with_path(tree)
        }
        before, after = paths(params), paths(arranged)
        moved = {p for p in before if after[p] is not before[p]}
        if dtype == jnp.bfloat16:
            assert arranged is params
            continue
        assert moved and all(
            any(name in p for name in weight_layout.CPU_READ_ORDERS) for p in moved
        ), moved
        assert len(moved) == 3 * len(params["layers"]), moved


def weight_copies(compiled_text, shapes, *, in_loops):
    """How many copies and transposes produce an array of one of `shapes`,
    in any axis order: inside the program's while loops (their bodies and
    the computations those call, branches included), or anywhere."""
    computations = {
        m.group(1): m.group(2)
        for m in re.finditer(
            r"\n%([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", compiled_text, re.DOTALL
        )
    }

    def callees(text):
        named = r"(?:calls|to_apply|body|condition|true_computation|false_computation)"
        branches = re.findall(r"branch_computations=\{([^}]*)\}", text)
        return re.findall(named + r"=%([\w.\-]+)", text) + [
            name for group in branches for name in re.findall(r"%([\w.\-]+)", group)
        ]

    searched, todo = set(), re.findall(r"body=%([\w.\-]+)", compiled_text)
    while todo:
        name = todo.pop()
        if name not in searched and name in computations:
            searched.add(name)
            todo += callees(computations[name])
    if not in_loops:
        searched = set(computations)
    wanted = {tuple(sorted(s)) for s in shapes}
    return sum(
        tuple(sorted(int(d) for d in dims.split(","))) in wanted
        for name in searched
        for dims in re.findall(
            r"= \w+\[([\d,]+)\]\{[^}]*\} (?:copy|transpose)\(", computations[name]
        )
    )


def attention_weight_shapes(model):
    attn = model.layers[0].attn
    return {
        "q, attn_vec": [attn.q_einsum.w.shape, attn.attn_vec_einsum.w.shape],
        "kv": [attn.kv_einsum.w.shape],
    }


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the in-loop copies are XLA:CPU's"
)
def test_float32_decode_copies_no_attention_weight_in_its_loop(tiny_path):
    """XLA:CPU copies every attention weight of a float32 model at every
    decode step unless the weights are arranged ahead of the program: q and
    attn_vec (one shape up to axis order) and kv, each checked."""
    model = load_hf_model(tiny_path, dtype=jnp.float32)
    state = prefilled(model)
    copies = {}
    for arranged in (False, True):
        params, run = decoder(model, arranged)
        text = run.lower(params, state, settings(0.0), jnp.int32(ROWS)).compile()
        for name, shapes in attention_weight_shapes(model).items():
            copies[name, arranged] = weight_copies(
                text.as_text(), shapes, in_loops=True
            )
    num_layers = len(model.layers)
    assert copies["q, attn_vec", False] >= 2 * num_layers, copies
    assert copies["kv", False] >= num_layers, copies
    assert copies["q, attn_vec", True] == copies["kv", True] == 0, copies


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the weight copies are XLA:CPU's"
)
def test_float32_prefill_copies_no_attention_weight(tiny_path):
    """Likewise, each prefill call copies every attention weight unless the
    weights are arranged ahead of it."""
    model = load_hf_model(tiny_path, dtype=jnp.float32)
    args = prefill_args(model)
    copies = {}
    for arranged in (False, True):
        params, run = prefiller(model, arranged)
        text = run.lower(params, *args).compile().as_text()
        for name, shapes in attention_weight_shapes(model).items():
            copies[name, arranged] = weight_copies(text, shapes, in_loops=False)
    num_layers = len(model.layers)
    assert copies["q, attn_vec", False] >= 2 * num_layers, copies
    assert copies["kv", False] >= num_layers, copies
    assert copies["q, attn_vec", True] == copies["kv", True] == 0, copies
