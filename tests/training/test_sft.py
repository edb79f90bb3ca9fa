"""LoRA SFT: data, a falling loss, Tunix-layout checkpoints that restore, resume."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from ctrl_c import WITH_DEFAULT_CTRL_C
from flax import nnx
from hf_models import make_tiny_hf_model
from safetensors.numpy import load_file

from gsm8k_jax.checkpoints.lora import LoraConfig, load_lora, qwix_lora_model
from gsm8k_jax.checkpoints.lora_checkpoint import (
    COMMIT_MARKER,
    LORA_CONFIG_FILE,
    read_lora_config,
    restore_lora_params,
)
from gsm8k_jax.eval.data import load_gsm8k
from gsm8k_jax.eval.extraction import extract_answer
from gsm8k_jax.eval.prompts import format_prompt
from gsm8k_jax.models.gemma3.config import CONFIGS, Gemma3Config
from gsm8k_jax.models.gemma3.params import export_hf_weights, hf_config, load_hf_model
from gsm8k_jax.models.specs import TINY_MODEL_DIR
from gsm8k_jax.sampling.decode import prompt_positions
from gsm8k_jax.stop_signals import Terminated, stop_on_signals
from gsm8k_jax.training import data as sft_data
from gsm8k_jax.training import sft, sft_checkpoints
from gsm8k_jax.training.config import SFTConfig

REPO = Path(__file__).resolve().parents[2]
LORA = LoraConfig(rank=4, alpha=8.0)
CONFIG = SFTConfig(
    learning_rate=3e-2,
    warmup_steps=2,
    num_steps=16,
    batch_size=4,
    max_length=256,
    checkpoint_every=12,
    seed=0,
    lora=LORA,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random HF Gemma 3 with the packaged 4,096-token tokenizer."""
    path = tmp_path_factory.mktemp("base")
    make_tiny_hf_model(path, vocab_size=4096)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TINY_MODEL_DIR / name, path / name)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


@pytest.fixture(scope="module")
def examples():
    return load_gsm8k(num_examples=32)


def lora_model(base_dir, config=CONFIG):
    base = load_hf_model(base_dir, dtype=jnp.float32)
    return qwix_lora_model(base, config.lora, seed=config.seed)


def logits(model, batch):
    valid = jnp.asarray(batch["valid"])
    hidden, _ = model(jnp.asarray(batch["tokens"]), prompt_positions(valid), valid)
    return np.asarray(model.logits(hidden))


def test_format_answer_ends_in_boxed_answer():
    solution = (
        "She sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"
    )
    text = sft_data.format_answer(solution)
    assert text == (
        "She sold 48/2 = 24 clips.\nIn all 48+24 = 72.\nThe final answer is \\boxed{72}."
    )
    assert extract_answer(text, "strict") == "72"
    with pytest.raises(ValueError, match="####"):
        sft_data.format_answer("no final line")


def test_make_examples_masks_the_answer_only(tokenizer, examples):
    data = sft_data.make_examples(tokenizer, examples[:4], max_length=256)
    assert {k: v.shape for k, v in data.items()} == {
        k: (4, 256) for k in ("tokens", "targets", "loss_mask", "valid")
    }
    row = 0
    valid, mask = data["valid"][row], data["loss_mask"][row] > 0
    np.testing.assert_array_equal(
        data["tokens"][row, 1:][valid[1:]], data["targets"][row][valid][:-1]
    )
    assert not mask[~valid].any()
    # Inputs up to the first answer target are exactly the evaluation prompt.
    start = int(np.argmax(mask))
    assert tokenizer.decode(data["tokens"][row][: start + 1]) == format_prompt(
        examples[0].question, tokenizer
    )
    answer = tokenizer.decode(data["targets"][row][mask])
    assert answer == sft_data.format_answer(examples[0].answer) + "<end_of_turn>"
    # Longer than max_length + 1 tokens: dropped, never truncated.
    lengths = data["valid"].sum(1) + 1  # Tokens per example.
    cut = int(np.sort(lengths)[1])
    short = sft_data.make_examples(tokenizer, examples[:4], max_length=cut - 1)
    kept = lengths <= cut
    assert 2 <= len(short["tokens"]) == kept.sum() < 4
    for key in data:
        np.testing.assert_array_equal(short[key], data[key][kept][:, : cut - 1])


def test_batches_are_reshuffled_each_epoch_and_reproducible():
    order = [sft_data.batch_indices(10, 4, step, seed=3) for step in range(5)]
    flat = np.concatenate(order)
    assert sorted(flat[:10]) == list(range(10)) == sorted(flat[10:20])
    assert not np.array_equal(flat[:10], flat[10:20])
    np.testing.assert_array_equal(sft_data.batch_indices(10, 4, 3, seed=3), order[3])


@pytest.fixture(scope="module")
def trained(base_dir, tokenizer, examples, tmp_path_factory):
    """One run: CONFIG, saving at steps 12 and 16.

    Its LoRA model is reused by the resume test: qwix gives every LoRA
    model a class of its own, so a second model would compile again.
    """
    root = tmp_path_factory.mktemp("lora_run")
    model = lora_model(base_dir)
    initial = nnx.to_pure_dict(nnx.state(model))
    losses = sft.train(
        model, tokenizer, examples, CONFIG, output_dir=root, progress=False
    )
    batch = sft_data.make_examples(tokenizer, examples[:3], max_length=256)
    return SimpleNamespace(
        model=model,
        initial=initial,
        losses=losses,
        root=root,
        batch=batch,
        logits=logits(model, batch),
    )


def test_lora_training_lowers_the_loss(trained):
    losses = trained.losses
    assert len(losses) == CONFIG.num_steps and np.isfinite(losses).all()
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 1.0, " ".join(f"{loss:.2f}" for loss in losses)


def test_checkpoint_restores_through_load_lora(trained, base_dir):
    params = restore_lora_params(trained.root / "actor")
    assert "layers/0/attn/q_einsum/w_lora_a" in params
    # The trainer records rank, alpha and module_path beside the steps.
    step = checkpoint_steps(trained.root)[-1]
    params_path = trained.root / "actor" / str(step) / "model_params"
    assert read_lora_config(params_path) == LORA
    assert all(np.abs(v).max() > 0 for k, v in params.items() if k.endswith("_lora_b"))
    base = load_hf_model(base_dir, dtype=jnp.float32)
    base_logits = logits(base, trained.batch)
    restored = load_lora(base, trained.root / "actor", LORA)  # Attached.
    valid = trained.batch["valid"]
    restored_logits = logits(restored, trained.batch)
    np.testing.assert_allclose(
        restored_logits[valid], trained.logits[valid], atol=1e-4, rtol=0
    )
    # Training changed the function: the base model's logits differ.
    assert np.abs(base_logits[valid] - trained.logits[valid]).max() > 1e-2


def checkpoint_steps(root):
    return sorted(int(p.name) for p in (root / "actor").iterdir() if p.name.isdigit())


def test_rerun_resumes_from_the_latest_step(
    trained, tokenizer, examples, tmp_path, monkeypatch
):
    assert checkpoint_steps(trained.root) == [12, 16]
    # A run interrupted after step 12, rerun with the same root (relative,
    # as on a command line) and settings, on a model back at its initial state.
    monkeypatch.chdir(tmp_path)
    root = Path("resumed")
    shutil.copytree(trained.root / "actor/12", root / "actor/12")
    # Step 16's save was cut short: on gs:// Orbax writes a step in place and
    # marks it committed last. Its folder is rewritten, not in the way.
    shutil.copytree(trained.root / "actor/16", root / "actor/16")
    (root / "actor/16" / COMMIT_MARKER).unlink()
    model = trained.model
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, trained.initial)
    nnx.update(model, state)
    run = lambda: sft.train(
        model, tokenizer, examples, CONFIG, output_dir=root, progress=False
    )
    resumed = run()
    # It continues from step 12, exactly: weights, optimizer state, batches.
    assert len(resumed) == 4
    np.testing.assert_allclose(resumed, trained.losses[12:], rtol=1e-5)
    assert checkpoint_steps(root) == [12, 16]
    expected = restore_lora_params(trained.root / "actor/16")
    for key, value in restore_lora_params(tmp_path / root / "actor/16").items():
        np.testing.assert_allclose(value, expected[key], atol=1e-6, err_msg=key)
    assert run() == []  # Finished already: nothing to do.


def test_resuming_with_another_lora_config_is_refused(
    trained, tokenizer, examples, tmp_path
):
    """Its recorded config is what evaluations of the earlier steps use: a
    rerun with another alpha must not rewrite it."""
    root = tmp_path / "run"
    shutil.copytree(trained.root / "actor", root / "actor")
    recorded = (root / "actor" / LORA_CONFIG_FILE).read_text()
    other = dataclasses.replace(
        CONFIG, num_steps=20, lora=dataclasses.replace(LORA, alpha=2.0)
    )
    with pytest.raises(ValueError, match=r"alpha=2\.0 \(trained with 8\.0\)"):
        sft.train(
            trained.model, tokenizer, examples, other, output_dir=root, progress=False
        )
    assert (root / "actor" / LORA_CONFIG_FILE).read_text() == recorded
    assert checkpoint_steps(root) == [12, 16]


def test_resuming_with_other_settings_is_refused(
    trained, tokenizer, examples, tmp_path
):
    """The settings recorded at the first save define the run's steps: a rerun
    may go further or save more often, but not change them; a run saved
    before they were recorded is not checked."""
    root = tmp_path / "run"
    shutil.copytree(trained.root / "actor", root / "actor")
    other = dataclasses.replace(
        CONFIG, num_steps=20, batch_size=2, learning_rate=0.1, seed=3
    )
    expected = (
        r"learning_rate=0\.1 \(trained with 0\.03\), batch_size=2 \(trained with 4\),"
        r" seed=3 \(trained with 0\), data='16 problems, sha256 \w+' \(trained with"
        r" '32 problems, sha256 \w+'\)"
    )
    with pytest.raises(ValueError, match=expected):
        sft.train(
            trained.model,
            tokenizer,
            examples[:16],
            other,
            output_dir=root,
            progress=False,
        )
    assert checkpoint_steps(root) == [12, 16]
    with pytest.raises(ValueError, match=r"prompt_template='Q: \{question\}'"):
        sft_checkpoints.check_resumable(
            root, CONFIG, examples, template="Q: {question}"
        )
    longer = dataclasses.replace(CONFIG, num_steps=20, checkpoint_every=5)
    sft_checkpoints.check_resumable(root, longer, examples)
    path = root / "actor" / sft_checkpoints.SETTINGS_FILE
    record = json.loads(path.read_text())
    del record["weight_decay"]  # As if the setting came later: its default.
    path.write_text(json.dumps(record))
    default = dataclasses.replace(CONFIG, weight_decay=SFTConfig.weight_decay)
    sft_checkpoints.check_resumable(root, default, examples)
    # The base model: checked where the run and the rerun both name it.
    sft_checkpoints.check_resumable(root, default, examples, base_model="sha256:b")
    record["base_model"] = "sha256:a"
    path.write_text(json.dumps(record))
    sft_checkpoints.check_resumable(root, default, examples, base_model="sha256:a")
    sft_checkpoints.check_resumable(root, default, examples)
    with pytest.raises(
        ValueError, match=r"base_model='sha256:b' \(trained with 'sha256:a'\)"
    ):
        sft_checkpoints.check_resumable(root, default, examples, base_model="sha256:b")
    path.write_text("{")
    with pytest.raises(ValueError, match="sft_settings.json is damaged"):
        sft_checkpoints.check_resumable(root, CONFIG, examples)
    path.unlink()  # As a run saved before settings were recorded.
    sft_checkpoints.check_resumable(root, other, examples)


def test_stop_signal_mid_step_saves_that_step_and_resume_continues(
    trained, tokenizer, examples, tmp_path, monkeypatch
):
    """SIGTERM inside step 3 of a run that saves only at its end: step 3
    finishes, is saved, and a rerun continues from it as the uninterrupted
    run did (weights, optimizer state and batches)."""
    root = tmp_path / "run"
    config = dataclasses.replace(CONFIG, checkpoint_every=0)
    real_step, steps = sft.train_step, []

    def step_with_signal(model, optimizer, batch):
        steps.append(len(steps) + 1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(model, optimizer, batch)

    def reset_model():
        state = nnx.state(trained.model)
        nnx.replace_by_pure_dict(state, trained.initial)
        nnx.update(trained.model, state)

    def run():
        return sft.train(
            trained.model, tokenizer, examples, config, output_dir=root, progress=False
        )

    reset_model()
    monkeypatch.setattr(sft, "train_step", step_with_signal)
    with pytest.raises(Terminated), stop_on_signals():
        run()
    assert steps == [1, 2, 3] and checkpoint_steps(root) == [3]
    monkeypatch.setattr(sft, "train_step", real_step)
    reset_model()
    np.testing.assert_allclose(run(), trained.losses[3:], rtol=1e-5)


def test_qwix_lora_model_refuses_a_module_path_matching_nothing(base_dir):
    base = load_hf_model(base_dir, dtype=jnp.float32)
    with pytest.raises(
        ValueError,
        match=r"module_path='nomatch' \(--model\.lora_config\.module_path; lm-eval's"
        r" model_args: lora_module_path\) matches no"
        r" layer of the model .*; Tunix's default is '\.\*q_einsum",
    ):
        qwix_lora_model(base, LoraConfig(module_path="nomatch"))


def test_export_inverts_loading(base_dir):
    exported = export_hf_weights(load_hf_model(base_dir, dtype=jnp.float32))
    original = load_file(base_dir / "model.safetensors")
    assert exported.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    for name, make_config in CONFIGS.items():
        config = make_config()
        assert Gemma3Config.from_hf(hf_config(config)) == config, name


def test_script_full_finetune_writes_hf_folders(tmp_path):
    """The script, in full fine-tune mode (LoRA mode runs in-process above)."""
    data = tmp_path / "train.jsonl"
    lines = (REPO / "gsm8k_jax/data/test.jsonl").read_text().splitlines()[:8]
    data.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "research/script/train_lora_sft.py"),
            "--full_finetune",
            f"--data_path={data}",
            f"--output_dir={tmp_path / 'run'}",
            "--num_steps=2",
            "--checkpoint_every=1",
            "--batch_size=2",
            "--max_length=256",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"Training steps 1 to 2 into {tmp_path / 'run/hf'};" in proc.stdout
    assert "Trained 2 steps" in proc.stdout
    folder = tmp_path / "run/hf/2"
    names = sorted(p.name for p in (tmp_path / "run/hf").iterdir())
    assert names == ["1", "2", sft_checkpoints.SETTINGS_FILE]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert (folder / "optimizer_state").is_dir()
    trained = load_hf_model(folder, dtype=jnp.float32)
    shipped = load_hf_model(TINY_MODEL_DIR, dtype=jnp.float32)
    assert trained.config == shipped.config
    assert not np.array_equal(
        trained.embedder.input_embedding.get_value(),
        shipped.embedder.input_embedding.get_value(),
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--data_path=", "--data_path"),
        # Training is float32 only: a dtype flag must not pass unnoticed.
        ("--model.dtype=bfloat16", "trains in float32, not --model.dtype=bfloat16"),
        ("--flagfile={flags}", "trains in float32, not --model.dtype=bfloat16"),
        # A negative rate ascends the loss; alpha 0 trains an update of zero.
        ("--learning_rate=-1", "error: learning_rate must be > 0, got -1.0."),
        ("--model.lora_config.alpha=0", "alpha=0.0 (--model.lora_config.alpha;"),
    ],
)
def test_script_refuses_in_one_line(tmp_path, flag, message):
    flags = tmp_path.parent / f"{tmp_path.name}.flags"  # Not in the output folder.
    flags.write_text("--model.dtype=bfloat16\n")
    flag = flag.format(flags=flags)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "research/script/train_lora_sft.py"),
            flag,
            f"--output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_script_refuses_an_output_dir_that_is_a_file(tmp_path):
    """Before any work, not at the first save."""
    output = tmp_path / "out"
    output.write_text("")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "research/script/train_lora_sft.py"),
            f"--output_dir={output}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"Cannot write to output folder {output}: {output} is a file" in proc.stderr
    assert "Traceback" not in proc.stderr and output.read_text() == ""


def train_script(data, output_dir, *flags):
    return [
        sys.executable,
        str(REPO / "research/script/train_lora_sft.py"),
        f"--data_path={data}",
        f"--output_dir={output_dir}",
        "--batch_size=2",
        "--max_length=256",
        *flags,
    ]


@pytest.fixture
def small_train_set(tmp_path):
    data = tmp_path / "train.jsonl"
    lines = (REPO / "gsm8k_jax/data/test.jsonl").read_text().splitlines()[:8]
    data.write_text("\n".join(lines) + "\n")
    return data


def test_script_ctrl_c_saves_the_steps_trained_and_rerun_resumes(
    tmp_path, small_train_set
):
    """Ctrl-C mid-run with the default --checkpoint_every=0 saves the current
    step and says so; rerunning resumes there. Compiled programs go to
    --compilation_cache_dir, for the rerun to read."""
    run, cache = tmp_path / "run", tmp_path / "jax_cache"
    cached = f"--compilation_cache_dir={cache}"
    proc = subprocess.Popen(
        [
            *WITH_DEFAULT_CTRL_C,
            *train_script(small_train_set, run, "--num_steps=100000", cached),
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        # tqdm's bar ("sft: ... 3/100000") shows the steps done.
        stderr, deadline = "", time.monotonic() + 300
        while not re.search(r"[1-9]\d*/100000", stderr):
            assert proc.poll() is None, stderr + proc.stderr.read()
            assert time.monotonic() < deadline, f"no step trained: {stderr}"
            stderr += os.read(proc.stderr.fileno(), 4096).decode()
        proc.send_signal(signal.SIGINT)
        stderr += proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr
    match = re.search(r"Interrupted: saved step (\d+) in (\S+); rerun", stderr)
    assert match, stderr
    step = int(match[1])
    assert match[2] == str(run / "actor") and checkpoint_steps(run) == [step]

    def rerun(num_steps):
        proc = subprocess.run(
            train_script(small_train_set, run, f"--num_steps={num_steps}", cached),
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    # The training step's programs (one per batch length) are on disk.
    assert any(path.name.startswith("jit_train_step-") for path in cache.iterdir())
    resumed = rerun(step + 1)
    assert f"Training step {step + 1} into {run / 'actor'};" in resumed
    assert "Trained 1 step, last loss" in resumed  # From the saved step.
    assert checkpoint_steps(run) == [step, step + 1]
    assert (
        f"Nothing to do: {run / 'actor'} is already at step {step + 1} (--num_steps=1)."
        in rerun(1)
    )


def test_script_interrupted_before_a_step_says_nothing_is_kept(
    tmp_path, small_train_set
):
    """A stop before the first step (here while the model loads) keeps nothing."""
    code = (
        "import runpy, sys\n"
        "from gsm8k_jax.models import registry\n"
        "def interrupted(*args, **kwargs):\n"
        "    raise KeyboardInterrupt\n"
        "registry.load_pretrained = interrupted\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            *train_script(small_train_set, tmp_path / "run")[1:],
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().endswith(
        "Interrupted: no step finished yet, nothing to keep."
    ), proc.stderr
    assert not (tmp_path / "run").exists()
