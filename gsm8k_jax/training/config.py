"""The settings of a fine-tuning run (`SFTConfig`)."""

from __future__ import annotations

import dataclasses

from gsm8k_jax.checkpoints import lora as lora_lib


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Settings of a fine-tuning run.

    Attributes:
      learning_rate: peak of the warmup-then-cosine schedule (decays to 0 at
        `num_steps`).
      warmup_steps: linear warmup from 0.
      num_steps: total optimizer steps (a resumed run counts from its
        checkpoint's step, and may raise it: the cosine then stretches to
        the new end, so the steps after the resumed one differ from those of
        a run started with the new value).
      batch_size: sequences per step.
      max_length: model input length; longer examples are dropped.
      weight_decay: AdamW's decoupled weight decay.
      checkpoint_every: save every this many steps (0: at the end only, or
        when a stop signal ends the run).
      seed: batch order and LoRA initialisation.
      lora: LoRA settings (alpha / rank scales the update); None trains every
        parameter (full fine-tune).
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 10
    num_steps: int = 100
    batch_size: int = 8
    max_length: int = 384
    weight_decay: float = 0.0
    checkpoint_every: int = 0
    seed: int = 0
    lora: lora_lib.LoraConfig | None = dataclasses.field(
        default_factory=lora_lib.LoraConfig
    )

    def __post_init__(self):
        for name in ("num_steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        # A rate of 0 trains nothing; a negative one ascends the loss.
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
