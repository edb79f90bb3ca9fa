"""lm-eval through our backend from Python (`simple_evaluate(model=GSM8KJaxLM(...))`),
with a LoRA checkpoint and lm-eval's chat template; its registration and its
refusals. The command line is exercised in tests/eval/test_lm_eval_parity.py."""

import logging
import socket
import subprocess
import sys

import pytest
from checkpoints.test_eval_lora import RANK, tiny_factors
from eval.test_lm_eval_parity import by_doc
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from lm_eval_tasks import local_name, write_local_tasks
from lora_checkpoints import write_tunix_checkpoint

from gsm8k_jax.checkpoints.lora import LoraConfig, load_lora
from gsm8k_jax.checkpoints.lora_checkpoint import TRAINING_SETTINGS_FILE
from gsm8k_jax.checkpoints.sources import model_revision
from gsm8k_jax.eval.data import load_gsm8k
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.eval.stopping import cut_at_stop_sequences, with_eos_text
from gsm8k_jax.eval.tasks import TASKS, format_prompts
from gsm8k_jax.lm_eval_backend import (
    GSM8KJaxLM,
    main,
    offline_if_the_hub_is_unreachable,
    register,
)
from gsm8k_jax.models.registry import load_pretrained
from gsm8k_jax.models.specs import TINY_MODEL_DIR
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

NUM_PROBLEMS = 4
MAX_GEN_TOKS = 16
ALPHA = 8.0


def test_simple_evaluate_with_a_lora_checkpoint_in_chat(tmp_path, caplog):
    actor = tmp_path / "run" / "actor"
    write_tunix_checkpoint(actor / "50" / "model_params", tiny_factors())
    # Recorded as trained on other base weights: the backend warns once.
    (actor / TRAINING_SETTINGS_FILE).write_text('{"base_model": "hf:0123abcd"}')
    with caplog.at_level(logging.WARNING):
        lm = GSM8KJaxLM(
            model_name="gemma3-tiny",
            lora_checkpoint_path=str(actor),
            lora_rank=RANK,
            lora_alpha=ALPHA,
            dtype="float32",
            batch_size=2,
        )
    assert [r.getMessage() for r in caplog.records].count(
        "the LoRA checkpoint was trained on base weights hf:0123abcd"
        f" ({actor / TRAINING_SETTINGS_FILE}), but {TINY_MODEL_DIR} holds"
        f" {model_revision(TINY_MODEL_DIR)}: merged into other weights, an adapter"
        " gives other answers. Check model_path in --model_args (a hub snapshot and"
        " a local copy of the same weights are named differently)."
    ) == 1
    task = local_name("gsm8k_cot_zeroshot")
    results = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(
            include_path=str(write_local_tasks(tmp_path / "tasks")),
            include_defaults=False,
        ),
        apply_chat_template=True,
        limit=NUM_PROBLEMS,
        gen_kwargs={"max_gen_toks": MAX_GEN_TOKS},
        log_samples=True,
    )
    docs = by_doc(results["samples"][task])
    texts = [docs[i]["strict-match"]["resps"][0][0] for i in range(NUM_PROBLEMS)]
    assert results["config"]["lora_checkpoint"] == str(actor / "50" / "model_params")

    # Our sampler on the bundled model, before and after merging the LoRA.
    preset = TASKS["gsm8k_cot_zeroshot_chat"]
    model, tokenizer, _ = load_pretrained("gemma3-tiny", dtype="float32")
    questions = [e.question for e in load_gsm8k(num_examples=NUM_PROBLEMS)]
    prompts = format_prompts(
        preset,
        questions,
        tokenizer,
        template=DEFAULT_PROMPT_TEMPLATE,
        system_prompt=None,
        use_chat_template=True,
    )
    assert [docs[i]["strict-match"]["arguments"][0][0] for i in range(4)] == prompts
    params = SamplingParams(max_generation_steps=MAX_GEN_TOKS, eos_ids=(1, 106))
    stops = with_eos_text(preset.until, tokenizer)

    def answers():
        return [
            cut_at_stop_sequences(c.text, stops)
            for c in Sampler(model, tokenizer).generate(prompts, params)
        ]

    base = answers()
    load_lora(model, actor, LoraConfig(rank=RANK, alpha=ALPHA))
    assert texts == answers() != base


def test_registered_for_the_command_line_beside_lm_evals_own_models():
    register()
    register()  # A second call (a second main in a notebook) changes nothing.
    assert get_model("gsm8k_jax") is GSM8KJaxLM
    assert get_model("hf").__name__ == "HFLM"


def test_bad_settings_are_refused_clearly():
    with pytest.raises(ValueError, match="Pass model_name=<one of gemma3-tiny,"):
        GSM8KJaxLM()
    with pytest.raises(ValueError, match="batch_size must be a positive number"):
        GSM8KJaxLM(model_name="gemma3-tiny", batch_size="auto")
    pretrained = GSM8KJaxLM(model_name="gemma3-1b-pt", model_path=str(TINY_MODEL_DIR))
    with pytest.raises(ValueError, match="gemma3-1b-pt is pretrained only"):
        pretrained.apply_chat_template([{"role": "user", "content": "2+2?"}])
    request = Instance(
        "generate_until", {}, ("Q: 2+2?", {"until": ["Q:"], "num_beams": 4}), 0
    )
    with pytest.raises(ValueError, match=r"generation settings \['num_beams'\]"):
        pretrained.generate_until([request])
    with pytest.raises(NotImplementedError, match="generate_until only"):
        pretrained.loglikelihood([request])
    with pytest.raises(ValueError, match="row_tile must be >= 1"):
        GSM8KJaxLM(model_name="gemma3-tiny", row_tile=0)


def test_row_tile_is_the_samplers_and_recorded():
    lm = GSM8KJaxLM(model_name="gemma3-tiny", row_tile="8")  # as lm-eval may pass it
    assert lm.sampler.row_tile == 8 and lm.get_model_info()["row_tile"] == 8


def test_without_lm_eval_the_command_line_says_how_to_install_it():
    """lm-eval is an extra: `python -m gsm8k_jax.lm_eval_backend` without it is
    one line naming the extra, no traceback."""
    code = (
        "import runpy, sys\n"
        "sys.modules['lm_eval'] = None  # as if not installed\n"
        "runpy.run_module('gsm8k_jax.lm_eval_backend', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert done.stderr == (
        "error: gsm8k_jax.lm_eval_backend needs lm-evaluation-harness:"
        " pip install 'gsm8k_jax[lmeval]'.\n"
    )


@pytest.fixture
def hub_offline_flags(monkeypatch):
    """The hub libraries' offline flags, restored after the test (`main`
    may turn them on)."""
    import datasets
    import huggingface_hub.constants as hub

    flags = [
        (hub, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ]
    for module, name in flags:
        monkeypatch.setattr(module, name, getattr(module, name))
    return flags


def test_an_unreachable_hub_points_to_the_offline_recipe(
    monkeypatch, capsys, hub_offline_flags
):
    import lm_eval.__main__

    def offline():
        raise ConnectionError(
            "Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)"
        )

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", offline)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main rewrites it.
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", "gsm8k_jax", "--tasks", "gsm8k"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "on the Hub" in err and "--include_path" in err


def test_a_hub_that_does_not_resolve_turns_on_offline_mode(
    monkeypatch, tmp_path, hub_offline_flags
):
    """Downloads fail there anyway, after `datasets` retried each for about
    25 s: offline, a task's data is read from the cache or fails at once.
    With a proxy (which may resolve the hub) or a resolving host, nothing
    changes."""
    import datasets
    import huggingface_hub.constants as hub

    def does_not_resolve(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, f"{host}: Name or service not known")

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for module, name in hub_offline_flags:
        setattr(module, name, False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    assert not offline_if_the_hub_is_unreachable() and not hub.is_offline_mode()
    monkeypatch.setattr(socket, "getaddrinfo", does_not_resolve)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert not offline_if_the_hub_is_unreachable() and not hub.is_offline_mode()
    monkeypatch.delenv("HTTPS_PROXY")
    assert offline_if_the_hub_is_unreachable()
    assert hub.is_offline_mode() and datasets.config.HF_HUB_OFFLINE
    with pytest.raises(ConnectionError, match="OfflineModeIsEnabled"):
        datasets.load_dataset("openai/gsm8k", "main", cache_dir=str(tmp_path))
