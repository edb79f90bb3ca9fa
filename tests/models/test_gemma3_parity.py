"""Our Gemma 3 equals transformers' Gemma3ForCausalLM on the same random weights."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from gsm8k_jax.models.gemma3.config import AttentionType, Gemma3Config
from gsm8k_jax.models.gemma3.params import CheckpointError, load_hf_model
from gsm8k_jax.models.gemma3.sharding import make_mesh
from gsm8k_jax.sampling.decode import prompt_positions
from hf_models import TINY_VARIANTS, make_tiny_hf_model

TOLERANCE = 1e-4
SEQ_LEN = 24  # Longer than the tiny models' sliding window of 8.


def reference_logits(
    ref: transformers.Gemma3ForCausalLM, ids: np.ndarray
) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor(ids)).logits.numpy()


def our_logits(model, ids, valid):
    valid = jnp.asarray(valid)
    hidden, _ = model(jnp.asarray(ids), prompt_positions(valid), valid)
    return np.asarray(model.logits(hidden))


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    # Seven layers: Gemma 3's own pattern, a global layer sixth.
    ref = make_tiny_hf_model(path, request.param, num_hidden_layers=7)
    return path, ref, load_hf_model(path, dtype=jnp.float32)


def test_config_read_from_config_json(tiny_pair):
    path, ref, model = tiny_pair
    config = model.config
    assert config.num_layers == 7 and config.sliding_window == 8
    assert config.layer_types.count(AttentionType.GLOBAL) == 1
    assert config.layer_types[5] == AttentionType.GLOBAL
    assert config.num_kv_heads == ref.config.num_key_value_heads


def test_unpadded_logits_match_transformers(tiny_pair):
    _, ref, model = tiny_pair
    ids = np.random.RandomState(0).randint(3, 512, (3, SEQ_LEN))
    ours = our_logits(model, ids, np.ones_like(ids, bool))
    np.testing.assert_allclose(ours, reference_logits(ref, ids), atol=TOLERANCE, rtol=0)


def test_left_padded_batch_matches_unpadded_reference(tiny_pair):
    _, ref, model = tiny_pair
    rng = np.random.RandomState(1)
    lengths = [SEQ_LEN, 5, 17, 1]
    ids = np.zeros((len(lengths), SEQ_LEN), np.int64)
    valid = np.zeros_like(ids, bool)
    for row, n in enumerate(lengths):
        ids[row, SEQ_LEN - n :] = rng.randint(3, 512, n)
        valid[row, SEQ_LEN - n :] = True
    ours = our_logits(model, ids, valid)
    assert np.isfinite(ours).all()
    for row, n in enumerate(lengths):
        expected = reference_logits(ref, ids[row : row + 1, SEQ_LEN - n :])[0]
        np.testing.assert_allclose(
            ours[row, SEQ_LEN - n :], expected, atol=TOLERANCE, rtol=0
        )


def test_rope_scaling_is_read_for_global_layers_only(tmp_path):
    make_tiny_hf_model(tmp_path, "gqa_rope_scaled")
    model = load_hf_model(tmp_path, dtype=jnp.float32)
    assert model.config.global_rope_scale == 8.0
    global_layer = model.layers[
        model.config.layer_types.index(AttentionType.GLOBAL)
    ].attn
    assert (global_layer.rope_base, global_layer.rope_scale) == (1e6, 8.0)
    assert (model.layers[0].attn.rope_base, model.layers[0].attn.rope_scale) == (
        1e4,
        1.0,
    )


def test_sharded_checkpoint_with_index(tmp_path):
    ref = make_tiny_hf_model(tmp_path / "single")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = load_hf_model(tmp_path / "sharded", dtype=jnp.float32)
    ids = np.random.RandomState(2).randint(3, 512, (1, SEQ_LEN))
    np.testing.assert_allclose(
        our_logits(model, ids, np.ones_like(ids, bool)),
        reference_logits(ref, ids),
        atol=TOLERANCE,
        rtol=0,
    )


def test_multimodal_checkpoint_uses_its_language_model(tmp_path):
    """Gemma 3 4b+ ship as Gemma3ForConditionalGeneration: prefixed keys, nested config."""
    ref = make_tiny_hf_model(tmp_path / "text")
    text_config = json.loads((tmp_path / "text" / "config.json").read_text())
    mm_dir = tmp_path / "multimodal"
    mm_dir.mkdir()
    mm_config = transformers.Gemma3Config(text_config=text_config).to_dict()
    (mm_dir / "config.json").write_text(json.dumps(mm_config))
    tensors = load_file(tmp_path / "text" / "model.safetensors")
    prefixed = {
        k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()
    }
    prefixed["model.vision_tower.dummy.weight"] = np.zeros((2, 2), np.float32)
    save_file(prefixed, mm_dir / "model.safetensors")

    model = load_hf_model(mm_dir, dtype=jnp.float32)
    ids = np.random.RandomState(3).randint(3, 512, (1, SEQ_LEN))
    np.testing.assert_allclose(
        our_logits(model, ids, np.ones_like(ids, bool)),
        reference_logits(ref, ids),
        atol=TOLERANCE,
        rtol=0,
    )


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(tmp_path, seed):
    """The default dtype: our bfloat16 logits are about as far from the
    float32 reference as transformers' own bfloat16 model's are (measured:
    mean 0.8-1.1x, max 0.9-1.4x of its error)."""
    ref = make_tiny_hf_model(tmp_path)
    model = load_hf_model(tmp_path)  # bfloat16 default
    assert model.embedder.input_embedding[...].dtype == jnp.bfloat16
    ids = np.random.RandomState(seed).randint(3, 512, (1, SEQ_LEN))
    ours = our_logits(model, ids, np.ones_like(ids, bool))
    expected = reference_logits(ref, ids)
    with torch.no_grad():
        theirs = ref.to(torch.bfloat16)(torch.tensor(ids)).logits.float().numpy()
    ours_error, their_error = np.abs(ours - expected), np.abs(theirs - expected)
    assert ours_error.mean() <= 1.5 * their_error.mean()
    assert ours_error.max() <= 2 * their_error.max()


def test_named_sizes_match_reference_table():
    from gsm8k_jax.models.gemma3 import config as cfg

    c1b = cfg.gemma3_1b()
    assert [i for i, t in enumerate(c1b.layer_types) if t == AttentionType.GLOBAL] == [
        5,
        11,
        17,
        23,
    ]
    assert cfg.gemma3_27b().query_pre_attn_scalar == 5376 / 32
    assert cfg.gemma3_4b().global_rope_scale == 8.0
    assert (c1b.num_heads, c1b.num_kv_heads, c1b.head_dim, c1b.sliding_window) == (
        4,
        1,
        256,
        512,
    )


# --- Loading errors are clear -------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_model(tmp_path / "nope")


def test_non_gemma3_config(tmp_path):
    transformers.LlamaConfig(hidden_size=64, num_attention_heads=4).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="Gemma 3 config.*llama"):
        load_hf_model(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    make_tiny_hf_model(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"
    ):
        load_hf_model(tmp_path)


def test_an_output_head_of_its_own_is_refused_not_ignored(tmp_path):
    """Gemma 3 ties its head to the embeddings; a checkpoint saved untied
    (its own lm_head.weight, tie_word_embeddings false) would lose its head
    here. A head saved beside a tied config is unread, as transformers
    leaves it."""
    make_tiny_hf_model(tmp_path)
    plain = nnx.to_pure_dict(nnx.state(load_hf_model(tmp_path, dtype=jnp.float32)))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = -tensors["model.embed_tokens.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    tied = nnx.to_pure_dict(nnx.state(load_hf_model(tmp_path, dtype=jnp.float32)))
    jax.tree.map(np.testing.assert_array_equal, tied, plain)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="an output head of its own"):
        load_hf_model(tmp_path)


def test_unreadable_weights_file_is_named(tmp_path):
    make_tiny_hf_model(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # A truncated download.
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("mesh", [None, "1x1"])
def test_misshaped_tensor_is_named(tmp_path, mesh):
    """Whole, and read in blocks onto a mesh (one block here)."""
    make_tiny_hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"gate_proj\.weight.*\(64, 128\).*\(64, 96\)"
    ):
        load_hf_model(tmp_path, mesh=mesh and make_mesh(data=1, model=1))


def test_folder_without_weights(tmp_path):
    make_tiny_hf_model(tmp_path / "full")
    shutil.copy(tmp_path / "full" / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="No \\*.safetensors"):
        load_hf_model(tmp_path)


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="not a multiple"):
        Gemma3Config(
            num_layers=1,
            embed_dim=8,
            hidden_dim=8,
            num_heads=3,
            num_kv_heads=2,
            head_dim=4,
            sliding_window=4,
            layer_types=(AttentionType.GLOBAL,),
            query_pre_attn_scalar=4,
        )
