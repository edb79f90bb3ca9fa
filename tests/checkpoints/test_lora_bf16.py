"""A LoRA in the default bfloat16 model: its update counts, and nothing else
changes.

Adapters from low-learning-rate SFT and RL change weights by ~0.1%:
bf16(W + delta) keeps about a quarter of such an update. The attached
adapter adds its update to each layer's float32 accumulator, so every layer
moves by the float32 update (to 1%, on average over its outputs), and zero
factors give the base run's bits.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from eval.test_eval_scripts import BASE_SCRIPT, LORA_SCRIPT, run_script
from flax import nnx
from lora_checkpoints import factor_shapes, write_tunix_checkpoint

from gsm8k_jax.checkpoints.lora import LoraConfig, apply_lora, detach_lora, load_lora
from gsm8k_jax.checkpoints.lora_checkpoint import restore_lora_params
from gsm8k_jax.eval.data import load_gsm8k
from gsm8k_jax.eval.results import RunFiles
from gsm8k_jax.eval.runner import EvalConfig, evaluate
from gsm8k_jax.models.gemma3.model import project
from gsm8k_jax.models.registry import load_pretrained
from gsm8k_jax.models.specs import TINY_MODEL_DIR
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

RANK, ALPHA = 4, 4.0  # scale alpha / rank = 1
CONFIG = LoraConfig(rank=RANK, alpha=ALPHA)
RELATIVE_SIZE = 1e-3
# How each factor pair lays out as its weight (qwix: a's contracting dims and
# the rank, then b's rank and the rest), and how each layer applies its
# weight, written out independently of the library's own mapping.
DELTA_EQUATIONS = {
    "attn/q_einsum/w": "dr,rnh->ndh",
    "attn/kv_einsum/w": "dr,rckh->ckdh",
    "attn/attn_vec_einsum/w": "nhr,rd->nhd",
    "mlp/gate_proj/kernel": "ir,ro->io",
    "mlp/up_proj/kernel": "ir,ro->io",
    "mlp/down_proj/kernel": "ir,ro->io",
}
LAYER_EQUATIONS = {
    "attn/q_einsum/w": "td,ndh->tnh",
    "attn/kv_einsum/w": "td,ckdh->tckh",
    "attn/attn_vec_einsum/w": "tnh,nhd->td",
    "mlp/gate_proj/kernel": "ti,io->to",
    "mlp/up_proj/kernel": "ti,io->to",
    "mlp/down_proj/kernel": "ti,io->to",
}
# Outputs per layer: enough for rounding's error (up to half a bf16 step,
# several times an update of 1e-3) to average out far below 1%.
OUTPUTS = 2**21


def base_weights(model):
    return {
        "/".join(map(str, path)): np.asarray(var.get_value(), np.float64)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def write_factors(root, factors):
    write_tunix_checkpoint(root / "actor" / "10" / "model_params", factors)
    return root / "actor"


@pytest.fixture(scope="module")
def small_update(tmp_path_factory):
    """(checkpoint, {weight path: float64 delta}): every delta is
    RELATIVE_SIZE of its weight (Frobenius norms)."""
    model, _, _ = load_pretrained("gemma3-tiny")
    weights = base_weights(model)
    hf_config = transformers.AutoConfig.from_pretrained(TINY_MODEL_DIR)
    rng = np.random.default_rng(0)
    factors, deltas = {}, {}
    for i in range(hf_config.num_hidden_layers):
        for name, shapes in factor_shapes(hf_config, RANK).items():
            a, b = (rng.standard_normal(s) for s in shapes)
            delta = np.einsum(DELTA_EQUATIONS[name], a, b)
            w = weights[f"layers/{i}/{name}"]
            b *= RELATIVE_SIZE * np.linalg.norm(w) / np.linalg.norm(delta)
            factors[(i, name)] = (a.astype(np.float32), b.astype(np.float32))
            deltas[f"layers/{i}/{name}"] = np.einsum(
                DELTA_EQUATIONS[name], *map(np.float64, factors[(i, name)])
            )
    return write_factors(tmp_path_factory.mktemp("small_lora"), factors), deltas


@pytest.fixture(scope="module")
def zero_update(tmp_path_factory):
    """A checkpoint whose every update is zero (b = 0, a random)."""
    hf_config = transformers.AutoConfig.from_pretrained(TINY_MODEL_DIR)
    rng = np.random.default_rng(1)
    factors = {
        (i, name): (rng.standard_normal(a).astype(np.float32), np.zeros(b, np.float32))
        for i in range(hf_config.num_hidden_layers)
        for name, (a, b) in factor_shapes(hf_config, RANK).items()
    }
    return write_factors(tmp_path_factory.mktemp("zero_lora"), factors)


def layer_output(model, name, x):
    """The layer of weight `name` ('layers/3/attn/q_einsum/w') applied to x."""
    *path, _ = name.split("/")
    layer = model
    for key in path:
        layer = layer[int(key)] if key.isdigit() else getattr(layer, key)
    if isinstance(layer, nnx.Linear):
        return project(layer, x[None])[0]
    return layer(x[None])[0]


def update_slope(moved, before, expected):
    """How far the outputs moved along the expected update, as a fraction of
    it (least squares): 1 when the update is kept, on average."""
    moved = np.asarray(moved, np.float64) - np.asarray(before, np.float64)
    return np.sum(moved * expected) / np.sum(expected * expected)


def test_attached_update_moves_every_layer_by_the_float32_update(small_update):
    """In the bf16 model each layer's outputs (rounded to bf16 once) move by
    the float64 update to 1% on average; rounding the update into the
    weights, bf16(W + delta), keeps far less of it."""
    actor, deltas = small_update
    model, _, _ = load_pretrained("gemma3-tiny")  # bfloat16, the default
    base, _, _ = load_pretrained("gemma3-tiny")
    load_lora(model, actor, CONFIG)
    weights = base_weights(base)
    rng = np.random.default_rng(2)
    for name, delta in deltas.items():
        kind = name.split("/", 2)[2]
        in_shape = {
            "attn/attn_vec_einsum/w": delta.shape[:2],
            "attn/q_einsum/w": delta.shape[1:2],
            "attn/kv_einsum/w": delta.shape[2:3],
        }.get(kind, delta.shape[:1])
        tokens = OUTPUTS * np.prod(in_shape) // delta.size
        x = jnp.asarray(rng.standard_normal((tokens, *in_shape)), jnp.bfloat16)
        x64 = np.asarray(x, np.float64)
        expected = np.einsum(LAYER_EQUATIONS[kind], x64, delta)
        before = layer_output(base, name, x)
        slope = update_slope(layer_output(model, name, x), before, expected)
        assert abs(slope - 1) < 0.01, (name, slope)
        # The test can fail: the same layer with the update rounded into its
        # bfloat16 weight keeps a fraction of it.
        rounded = jnp.asarray(weights[name] + delta, jnp.bfloat16)
        rounded_out = np.einsum(
            LAYER_EQUATIONS[kind], x64, np.asarray(rounded, np.float64)
        )
        exact_base = np.einsum(LAYER_EQUATIONS[kind], x64, weights[name])
        assert abs(update_slope(rounded_out, exact_base, expected) - 1) > 0.2, name


def test_zero_update_gives_the_base_run_bit_for_bit(zero_update, tmp_path):
    """Through the scripts, in the default dtype: a LoRA run differs from
    the base run by its update alone (the run records how it was applied)."""
    common = ("--num_examples=8", "--batch_size=4", "--max_generation_steps=32")
    run_script(*common, f"--output_dir={tmp_path / 'base'}", script=BASE_SCRIPT)
    run_script(
        *common,
        f"--model.lora_config.rank={RANK}",
        f"--model.lora_config.alpha={ALPHA}",
        f"--model.lora_checkpoint_path={zero_update}",
        f"--output_dir={tmp_path / 'lora'}",
        script=LORA_SCRIPT,
    )
    runs = {}
    for name in ("base", "lora"):
        (summary_path,) = (tmp_path / name).glob("summary_*.json")
        record = json.loads(summary_path.read_text())["run"]
        assert record["model"]["dtype"] == "bfloat16"
        (rollouts_path,) = (tmp_path / name).glob("rollouts_*.jsonl")
        rows = map(json.loads, rollouts_path.read_text().splitlines())
        runs[name] = (
            record["lora_mode"],
            [(r["response"], r["logprob"]) for r in rows],
        )
    assert runs["base"][0] is None and runs["lora"][0] == "attached"
    assert runs["lora"][1] == runs["base"][1]


def test_attaching_again_replaces_and_merging_on_top_is_refused(small_update):
    """A notebook cell run twice must not add the update twice."""
    actor, _ = small_update
    model, _, _ = load_pretrained("gemma3-tiny")
    base = base_weights(model)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 128)), jnp.bfloat16)
    name = "layers/2/mlp/gate_proj/kernel"
    load_lora(model, actor, CONFIG)
    once = np.asarray(layer_output(model, name, x))
    load_lora(model, actor, CONFIG)
    np.testing.assert_array_equal(np.asarray(layer_output(model, name, x)), once)
    for target in (model, nnx.clone(model)):
        with pytest.raises(ValueError, match="has a LoRA attached"):
            load_lora(target, actor, CONFIG, merge=True)
    detach_lora(model)
    assert all(np.array_equal(base_weights(model)[k], v) for k, v in base.items())
    # Merged in float32, then attached or merged on top: refused.
    load_lora(model, actor, CONFIG, merge=True)
    for merge in (False, True):
        with pytest.raises(ValueError, match="already has a LoRA update merged in"):
            load_lora(model, actor, CONFIG, merge=merge)


def test_qwix_samples_a_bfloat16_model_as_the_attached_adapter(small_update):
    """Unmerged through qwix (`apply_lora`, as in training) in the default
    dtype, on CPU: the attached adapter's tokens and log-probabilities, to
    the bit, which are not the base model's. (XLA:CPU once failed this
    model's first prefill, and bfloat16 factors rounded a float32
    checkpoint's.)"""
    actor, _ = small_update
    base, tokenizer, _ = load_pretrained("gemma3-tiny")
    attached = nnx.clone(base)
    load_lora(attached, actor, CONFIG)
    through_qwix = apply_lora(base, restore_lora_params(actor), CONFIG)
    prompts = [p.question for p in load_gsm8k(num_examples=4)]
    params = SamplingParams(max_generation_steps=16)
    runs = {
        name: [
            (c.tokens, c.logprob)
            for c in Sampler(model, tokenizer).generate(prompts, params)
        ]
        for name, model in [
            ("base", base),
            ("attached", attached),
            ("qwix", through_qwix),
        ]
    }
    assert runs["qwix"] == runs["attached"]
    assert runs["attached"] != runs["base"]


def test_merge_keeps_the_update_in_float32_weights(small_update):
    """The other mode: merged into float32 weights, each update within 1%."""
    actor, deltas = small_update
    model, _, _ = load_pretrained("gemma3-tiny")
    before = base_weights(model)
    load_lora(model, actor, CONFIG, merge=True)
    after = base_weights(model)
    for name, delta in deltas.items():
        error = np.linalg.norm(after[name] - before[name] - delta)
        assert error / np.linalg.norm(delta) < 0.01, name


def test_eval_script_runs_what_the_api_attaches(small_update, tmp_path):
    """eval_gsm8k.py in the default dtype gives, bit for bit, what
    `load_lora` and `evaluate` give."""
    actor, _ = small_update
    steps, examples = 24, 8
    run_script(
        f"--num_examples={examples}",
        "--batch_size=4",
        f"--max_generation_steps={steps}",
        f"--model.lora_config.rank={RANK}",
        f"--model.lora_config.alpha={ALPHA}",
        f"--model.lora_checkpoint_path={actor}",
        f"--output_dir={tmp_path / 'script'}",
        script=LORA_SCRIPT,
    )
    (rollouts_path,) = (tmp_path / "script").glob("rollouts_*.jsonl")
    script_rows = [json.loads(line) for line in rollouts_path.read_text().splitlines()]

    model, tokenizer, _ = load_pretrained("gemma3-tiny")
    load_lora(model, actor, CONFIG)
    files = RunFiles(tmp_path / "api", "api")
    files.prepare({}, resume=False, overwrite=True)
    config = EvalConfig(
        batch_size=4, sampling=SamplingParams(max_generation_steps=steps)
    )
    evaluate(
        Sampler(model, tokenizer),
        load_gsm8k()[:examples],
        config,
        files,
        run_info={},
        show_progress=False,
    )
    keys = ("id", "response", "logprob")
    assert [tuple(r[k] for k in keys) for r in script_rows] == [
        tuple(r[k] for k in keys) for r in files.read_rollouts()
    ]
