"""Gemma 3 config.json files and tokenizers read without transformers' Auto
classes, checked against what transformers itself reads from the same folder."""

import copy
import dataclasses
import json
import shutil

import pytest
import transformers

from gsm8k_jax.models.gemma3.config import CONFIGS as NAMED_CONFIGS
from gsm8k_jax.models.gemma3.config import Gemma3Config
from gsm8k_jax.models.gemma3.hf_config import TEXT_DEFAULTS, text_fields
from gsm8k_jax.models.gemma3.params import CheckpointError, load_config
from gsm8k_jax.models.registry import load_tokenizer
from gsm8k_jax.models.specs import TINY_MODEL_DIR

# The formats of the released checkpoints' config.json files: 1b's text-only
# config in transformers 4.50's older fields; 4b's, 12b's and 27b's
# multimodal configs, whose text_config leaves out every field equal to a
# default.
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "vocab_size": 262144,
}
# 270m's, in transformers 4.56's fields: layer_types spelled out.
GEMMA3_270M = {
    "_sliding_window_pattern": 6,
    "architectures": ["Gemma3ForCausalLM"],
    "head_dim": 256,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "layer_types": [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)
    ],
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "use_bidirectional_attention": False,
    "vocab_size": 262144,
}
SIGLIP = {
    "hidden_size": 1152,
    "image_size": 896,
    "intermediate_size": 4304,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
    "vision_use_head": False,
}


def _multimodal(text_config):
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text_config,
        "vision_config": SIGLIP,
    }


GEMMA3_4B = _multimodal(
    {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    }
)
GEMMA3_12B = _multimodal(
    {
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "model_type": "gemma3_text",
        "num_attention_heads": 16,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    }
)
GEMMA3_27B = _multimodal(
    {
        "head_dim": 128,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "model_type": "gemma3_text",
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    }
)


def _variant(base, **changes):
    config = copy.deepcopy(base)
    config.update(changes)
    return config


RELEASED = {
    "270m": GEMMA3_270M,
    "1b": GEMMA3_1B,
    "4b": GEMMA3_4B,
    "12b": GEMMA3_12B,
    "27b": GEMMA3_27B,
}
FORMATS = {
    **RELEASED,
    "tiny (transformers 5 format)": json.loads(
        (TINY_MODEL_DIR / "config.json").read_text()
    ),
    "multimodal, no text_config": _multimodal(None),
    "older 'type' key in rope_scaling": _variant(
        GEMMA3_1B, rope_scaling={"type": "linear", "factor": 4.0}
    ),
    "other RoPE bases, pattern 3": _variant(
        GEMMA3_1B, rope_theta=5e5, rope_local_base_freq=2e4, sliding_window_pattern=3
    ),
    "layer_types given, softcaps set": _variant(
        GEMMA3_1B,
        num_hidden_layers=4,
        layer_types=["full_attention", "sliding_attention"] * 2,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "rope_parameters for global layers only": _variant(
        {k: v for k, v in GEMMA3_1B.items() if not k.startswith("rope")},
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0}},
    ),
}


def _transformers_text_config(folder):
    config = transformers.AutoConfig.from_pretrained(folder)
    return getattr(config, "text_config", None) or config


@pytest.mark.parametrize("name", FORMATS)
def test_config_fields_are_transformers_own(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(FORMATS[name]))
    ours = text_fields(FORMATS[name])
    theirs = _transformers_text_config(tmp_path)
    for field in TEXT_DEFAULTS.keys() - {"rope_parameters"}:
        assert ours[field] == getattr(theirs, field), (name, field)
    for layer_type, params in theirs.rope_parameters.items():
        mine = ours["rope_parameters"][layer_type]
        for key in ("rope_type", "rope_theta", "factor"):
            assert mine.get(key) == params.get(key), (name, layer_type, key)


@pytest.mark.parametrize("name", FORMATS)
def test_load_config_equals_reading_through_transformers(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(FORMATS[name]))
    expected = Gemma3Config.from_hf(_transformers_text_config(tmp_path))
    assert load_config(tmp_path) == expected


def test_released_sizes_read_as_their_named_configs():
    for size, config in RELEASED.items():
        ours = Gemma3Config.from_hf(config)
        named = NAMED_CONFIGS[f"gemma3-{size}"]()
        # Multimodal configs count the image tokens in their vocabulary.
        assert ours == dataclasses.replace(named, vocab_size=ours.vocab_size), size


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "is not valid JSON"),
        ("[1, 2]", "holds no JSON object"),
        (json.dumps({"model_type": "llama"}), "implements Gemma 3 only"),
        (
            json.dumps(_variant(GEMMA3_1B, use_bidirectional_attention=True)),
            "causal language model only",
        ),
        (
            json.dumps(_variant(GEMMA3_1B, rope_scaling={"rope_type": "yarn"})),
            "Unsupported rope_type 'yarn'",
        ),
        (
            json.dumps(_variant(GEMMA3_1B, rope_scaling={"rope_type": "linear"})),
            "lacks the field 'factor'",
        ),
        (json.dumps(_variant(GEMMA3_1B, head_dim=None)), "its head_dim is None"),
        (
            json.dumps(_variant(GEMMA3_1B, rope_theta=None)),
            "its rope_theta of full_attention layers is None, not a number",
        ),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as error:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "tokenizer_class",
    [
        "PreTrainedTokenizerFast",
        "GemmaTokenizer",
        "GemmaTokenizerFast",
        "TokenizersBackend",
        "LlamaTokenizerFast",  # not a Gemma class: through AutoTokenizer
        None,
    ],
)
def test_tokenizer_is_the_one_autotokenizer_loads(tmp_path, tokenizer_class):
    shutil.copytree(TINY_MODEL_DIR, tmp_path, dirs_exist_ok=True)
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tokenizer_config.pop("tokenizer_class")
    if tokenizer_class:
        tokenizer_config["tokenizer_class"] = tokenizer_class
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    ours = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(ours) is type(theirs)
    chat = [{"role": "user", "content": "Janet's ducks lay 16 eggs per day."}]
    texts = ["Natalia sold clips to 48 of her friends.", " 12 + 7 = \\boxed{19}"]
    assert ours.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    ) == theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ours(texts)["input_ids"] == theirs(texts)["input_ids"]
    ids = theirs(texts[1])["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
        ids, skip_special_tokens=True
    )
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "padding_side"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute


def test_a_folder_of_steps_points_to_its_latest(tmp_path):
    """The trainer's --full_finetune writes <output_dir>/hf/<step>/."""
    for step in (2, 10):
        (tmp_path / str(step)).mkdir()
        shutil.copy(TINY_MODEL_DIR / "config.json", tmp_path / str(step))
    with pytest.raises(CheckpointError, match=f"latest step, {tmp_path / '10'}\\?$"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match=r"\*\.safetensors\)\.$"):
        load_config(tmp_path / "2" / "missing")
