"""How a LoRA adapter was trained: rank, alpha and the layers it targets;
and the ways a model can carry one.

Apart from `checkpoints.lora_checkpoint` and `checkpoints.lora` so that
reading or writing the setting (every `--model` config has one) imports
neither Orbax nor qwix.
"""

from __future__ import annotations

import dataclasses
import re

# Tunix's usual target modules (older configs omit attn_vec_einsum).
DEFAULT_MODULE_PATH = (
    ".*q_einsum|.*kv_einsum|.*gate_proj|.*down_proj|.*up_proj|.*attn_vec_einsum"
)
# What `lora_state.lora_mode` returns for a model carrying a LoRA: attached
# beside its weights, merged into them or run through qwix.
LORA_MODES = ("attached", "merged", "qwix")
# Names the settings in messages, as the command line spells them.
CONFIG_FLAG = "--model.lora_config"


def named_setting(field: str, value) -> str:
    """A LoRA setting as messages name it, for notebook, command line and
    lm-eval alike: `LoraConfig rank=8 (--model.lora_config.rank; lm-eval's
    model_args: lora_rank)`."""
    return (
        f"LoraConfig {field}={value!r} ({CONFIG_FLAG}.{field}; lm-eval's"
        f" model_args: lora_{field})"
    )


class _DefaultAlpha(float):
    """LoraConfig's alpha where none was given: a float like any other, but
    marked, so that a checkpoint recording no alpha (Tunix's) can warn that
    it was assumed. A deep copy (`dataclasses.asdict`) is a plain float:
    settings written out (a `--model` config, a run record) and read back
    are the values, given by whoever wrote them."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(float(self))

    def __deepcopy__(self, memo) -> float:
        return float(self)


# The Tunix CLI's example (rank 16); qwix has no default, and Tunix's GSM8K
# examples train with rank 64, alpha 64.0.
DEFAULT_ALPHA = _DefaultAlpha(2.0)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """How the adapter was trained; rank and alpha must match training.

    Attributes:
      rank: r, the inner dimension of the factors (checked against the
        checkpoint).
      alpha: scales the update by alpha / rank; not in Tunix's checkpoints
        (our trainer records it beside them). The default 2.0 is the example
        in the Tunix CLI's config (with rank 16); qwix has none, and Tunix's
        GSM8K GRPO examples use rank 64, alpha 64.0. Loading a checkpoint
        that records no alpha with the default warns (`alpha_given`).
      module_path: regex that qwix matches (re.fullmatch) against '/'-joined
        module paths such as `layers/0/attn/q_einsum`.
    """

    rank: int = 16
    alpha: float = DEFAULT_ALPHA
    module_path: str = DEFAULT_MODULE_PATH

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"{named_setting('rank', self.rank)}: must be >= 1.")
        if not self.alpha > 0:  # 0 cancels the update; a negative one inverts it.
            raise ValueError(
                f"{named_setting('alpha', self.alpha)}: must be > 0 (the update is"
                " scaled by alpha / rank)."
            )
        try:
            re.compile(self.module_path)
        except re.error as e:
            raise ValueError(
                f"{named_setting('module_path', self.module_path)} is not a valid"
                f" regex: {e}."
            ) from e

    @property
    def alpha_given(self) -> bool:
        """False where alpha was left at the default (DEFAULT_ALPHA) when
        this config was made (or the one `dataclasses.replace` copied); 2.0
        given is given, and so is the default once through `asdict`."""
        return not isinstance(self.alpha, _DefaultAlpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def differing_fields(self, other: LoraConfig) -> list[str]:
        """The names of the fields whose values differ from `other`'s."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
