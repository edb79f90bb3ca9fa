r"""Fine-tunes a Gemma 3 on GSM8K solutions: LoRA (default) or every weight.

    python research/script/train_lora_sft.py --model=configs/gemma3_tiny.py \
        --model.lora_config.rank=16 --model.lora_config.alpha=16.0 \
        --output_dir=runs/tiny-lora --num_steps=200 --batch_size=8

LoRA checkpoints land in `<output_dir>/actor/<step>/model_params` (Tunix's
layout; evaluate with `eval_gsm8k.py --model.lora_checkpoint_path=<output_dir>/actor`
and the same rank, alpha and module_path); `--full_finetune` writes Hugging
Face folders `<output_dir>/hf/<step>/` instead (evaluate with
`eval_gsm8k_base.py --model.model_path=<output_dir>/hf/<step>`). Rerunning the
same command resumes from the latest step; one with other training settings
(but --num_steps and --checkpoint_every) is refused. Ctrl-C or SIGTERM saves
the steps trained since the last save, then stops. Parameters train in
float32 (`--model.dtype` other than float32 is refused). See
gsm8k_jax/training/sft.py.

--data_path defaults to GSM8K's train split, bundled with the package.
"""

import sys
from pathlib import Path

from gsm8k_jax.quiet import quiet_imports

quiet_imports()  # Before anything loads transformers.

from absl import flags

from gsm8k_jax.eval import cli_flags, script_main
from gsm8k_jax.eval.data import BUNDLED_TRAIN_SET
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.stop_signals import Terminated
from gsm8k_jax.storage import require_writable

REPO = Path(__file__).resolve().parents[2]

cli_flags.define_model_flag(REPO / "configs" / "gemma3_tiny.py")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Checkpoint root (LoRA: local or gs://).", required=True
)
_DATA_PATH = flags.DEFINE_string(
    "data_path",
    str(BUNDLED_TRAIN_SET),
    "GSM8K training JSONL (local or gs://); default: the bundled train split.",
)
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "Use only the first N problems."
)
_FULL_FINETUNE = flags.DEFINE_bool(
    "full_finetune", False, "Train every weight instead of LoRA factors."
)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 10, "Linear warmup steps.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 100, "Total optimizer steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", 384, "Model input length; longer examples are dropped."
)
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 0, "Save every N steps (0: at the end only)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Batch order and LoRA initialisation.")
_PROMPT_TEMPLATE = flags.DEFINE_string(
    "prompt_template", DEFAULT_PROMPT_TEMPLATE, "User turn; must contain {question}."
)
cli_flags.define_compilation_cache_flag()


def main(argv):
    del argv
    # Heavy imports after flag parsing: --help stays fast.
    from gsm8k_jax.checkpoints.lora import LoraConfig, qwix_lora_model
    from gsm8k_jax.checkpoints.sources import model_revision
    from gsm8k_jax.eval.cli import start_compilation_cache
    from gsm8k_jax.eval.data import load_gsm8k
    from gsm8k_jax.models.registry import load_pretrained
    from gsm8k_jax.training import sft, sft_checkpoints
    from gsm8k_jax.training.config import SFTConfig

    cfg = flags.FLAGS.model
    cli_flags.check_model_config(cfg)
    if "dtype" in cli_flags.given_model_fields(sys.argv) and cfg.dtype != "float32":
        raise ValueError(
            f"train_lora_sft.py trains in float32, not --model.dtype={cfg.dtype}:"
            " drop the flag (evaluate the checkpoint in any dtype with the eval"
            " scripts)."
        )
    if cfg.lora_checkpoint_path:
        raise ValueError(
            "train_lora_sft.py writes checkpoints to --output_dir and takes no"
            " --model.lora_checkpoint_path."
        )
    if not _DATA_PATH.value:
        raise ValueError(
            "No GSM8K training set: pass --data_path (a GSM8K-style JSONL file), or"
            " leave it out for the bundled train split."
        )
    require_writable(_OUTPUT_DIR.value)  # Before any work.
    start_compilation_cache()  # A rerun (resuming) skips compiling its step.
    config = SFTConfig(
        learning_rate=_LEARNING_RATE.value,
        warmup_steps=_WARMUP_STEPS.value,
        num_steps=_NUM_STEPS.value,
        batch_size=_BATCH_SIZE.value,
        max_length=_MAX_LENGTH.value,
        weight_decay=_WEIGHT_DECAY.value,
        checkpoint_every=_CHECKPOINT_EVERY.value,
        seed=_SEED.value,
        lora=None if _FULL_FINETUNE.value else LoraConfig(**cfg.lora_config.to_dict()),
    )
    examples = load_gsm8k(_DATA_PATH.value, _NUM_EXAMPLES.value)
    # Before the model loads.
    sft_checkpoints.check_resumable(
        _OUTPUT_DIR.value, config, examples, _PROMPT_TEMPLATE.value
    )
    where = sft_checkpoints.checkpoint_dir(_OUTPUT_DIR.value, config)
    saved = sft_checkpoints.latest_step(_OUTPUT_DIR.value, config) or 0
    if saved >= config.num_steps:  # Before the model loads: nothing to train.
        print(
            f"Nothing to do: {where} is already at step {saved}"
            f" (--num_steps={config.num_steps})."
        )
        return
    first, last = saved + 1, config.num_steps
    steps = f"step {last}" if first == last else f"steps {first} to {last}"
    print(
        f"Training {steps} into {where}; the first step compiles the training program.",
        flush=True,
    )
    try:
        model, tokenizer, model_dir = load_pretrained(
            cfg.model_name, cfg.model_path or None, dtype="float32"
        )
        if config.lora is not None:
            model = qwix_lora_model(model, config.lora, seed=config.seed)
        losses = sft.train(
            model,
            tokenizer,
            examples,
            config,
            output_dir=_OUTPUT_DIR.value,
            template=_PROMPT_TEMPLATE.value,
            base_model=model_revision(model_dir),
        )
    except (KeyboardInterrupt, Terminated) as stop:
        step = sft_checkpoints.latest_step(_OUTPUT_DIR.value, config)
        if step is None:
            raise type(stop)("no step finished yet, nothing to keep") from stop
        raise type(stop)(
            f"saved step {step} in {where}; rerun the same command to resume"
        ) from stop
    steps = "step" if len(losses) == 1 else "steps"
    print(f"Trained {len(losses)} {steps}, last loss {losses[-1]:.4f}.")
    print(f"Checkpoints: {where}")


if __name__ == "__main__":
    script_main.run_main(main, kept="checkpoints saved so far are kept")
