"""An lm-evaluation-harness model backed by our Gemma 3 and sampler.

Run lm-eval's own tasks, prompts and scoring on our model, base or LoRA:

    python -m gsm8k_jax.lm_eval_backend run --model gsm8k_jax \\
        --model_args model_name=gemma3-1b-it,lora_checkpoint_path=gs://b/run/actor \\
        --tasks gsm8k --apply_chat_template --batch_size 64

or from Python:

    lm_eval.simple_evaluate(model=GSM8KJaxLM(model_name="gemma3-1b-pt"),
                            tasks=["gsm8k"])

lm-eval 0.4.13 has no plugin entry points: `--model NAME` only finds a model
registered in its own process, and one registered before `lm_eval.models`
is imported hides the built-in models. So `run` imports those, registers
`gsm8k_jax`, then hands its arguments to lm-eval's CLI.

Generation is our Sampler's, so answers never depend on `--batch_size`;
each request's text is cut at its `until` strings and the eos token's text,
where lm-eval's hf model cuts it (stopping.py). Every prompt starts with one
`<bos>` (chat prompts carry theirs), as Gemma needs: compare with
`--model hf` under `add_bos_token=True`. Only `generate_until` is served,
which is all GSM8K's tasks ask for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

try:
    import lm_eval.models  # noqa: F401  (the built-in models, before ours)
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import normalize_gen_kwargs
except ImportError as e:
    _NEEDS_LM_EVAL = (
        "gsm8k_jax.lm_eval_backend needs lm-evaluation-harness:"
        " pip install 'gsm8k_jax[lmeval]'."
    )
    if __name__ == "__main__":  # python -m: one line, no traceback.
        sys.exit(f"error: {_NEEDS_LM_EVAL}")
    raise ImportError(_NEEDS_LM_EVAL) from e
from tqdm import tqdm

from gsm8k_jax.checkpoints import lora as lora_lib
from gsm8k_jax.checkpoints import lora_checkpoint
from gsm8k_jax.checkpoints.sources import model_revision
from gsm8k_jax.eval.cli import local_mesh
from gsm8k_jax.eval.script_main import USER_ERRORS
from gsm8k_jax.eval.stopping import (
    cut_at_stop_sequences,
    stop_token_sequences,
    with_eos_text,
)
from gsm8k_jax.eval.tasks import LM_EVAL_MAX_GEN_TOKS, apply_chat_template
from gsm8k_jax.kernel_choice import fix_gpu_kernels, recorded_autotune_level
from gsm8k_jax.models.registry import default_eos_ids, load_pretrained
from gsm8k_jax.models.specs import MODELS, model_spec
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

__all__ = ["MODEL_NAME", "GSM8KJaxLM", "main", "register"]

MODEL_NAME = "gsm8k_jax"
_ONLY_GENERATION = (
    f"{MODEL_NAME} serves generate_until only (GSM8K's tasks); use lm-eval's hf"
    " model for log-likelihood tasks."
)
_SAMPLING_KWARGS = {"do_sample", "temperature", "top_p", "top_k"}

logger = logging.getLogger(__name__)


class GSM8KJaxLM(LM):
    """lm-eval's `generate_until`, served by gsm8k_jax's Sampler.

    Args (lm-eval's `--model_args`):
      model_name: a gsm8k_jax model (`gemma3-1b-it`, ...); its
        `instruction_tuned` flag decides whether a chat template is allowed.
      model_path: hub id, local folder or gs:// (default: the name's).
      dtype: bfloat16 (default) or float32.
      lora_checkpoint_path: a Tunix LoRA checkpoint (`<root>/actor` or a
        step), local or gs://, attached beside the weights (`attach_lora`).
      lora_rank, lora_alpha, lora_module_path: the adapter's training
        settings; read from our trainer's `lora_config.json` when it wrote
        one (a contradicting value is refused).
      batch_size: sequences decoded in parallel (lm-eval's `--batch_size`),
        rounded up to whole row tiles; answers do not depend on it.
      max_gen_toks: most new tokens when a request does not say.
      seed: sampling seed, for requests with `do_sample`.
      row_tile: slots per decode program (default: the platform's); a tile
        matched to a small batch computes no empty rows. Answers are the
        same bits at any batch size for one tile, not across tiles.
      device, max_batch_size: passed by lm-eval's CLI and unused: JAX runs on
        all local devices.
    """

    def __init__(
        self,
        model_name: str | None = None,
        model_path: str | None = None,
        dtype: str = "bfloat16",
        lora_checkpoint_path: str | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_module_path: str | None = None,
        batch_size: int | str = 32,
        max_gen_toks: int = LM_EVAL_MAX_GEN_TOKS,
        seed: int = 0,
        row_tile: int | None = None,
        device: str | None = None,
        max_batch_size: int | None = None,
    ):
        super().__init__()
        del device, max_batch_size
        if model_name is None:
            raise ValueError(
                f"Pass model_name=<one of {', '.join(MODELS)}> in --model_args."
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(
                f"batch_size must be a positive number for {MODEL_NAME}, got"
                f" {batch_size!r}."
            )
        self.spec = model_spec(model_name)
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        model, self.tokenizer, self.model_dir = load_pretrained(
            model_name, model_path, dtype=dtype
        )
        self.eos_ids = default_eos_ids(self.model_dir)
        self.lora_path, self.lora_config = "", None
        if lora_checkpoint_path:
            given = {
                field: value
                for field, value in (
                    ("rank", lora_rank),
                    ("alpha", lora_alpha),
                    ("module_path", lora_module_path),
                )
                if value is not None
            }
            trained = lora_checkpoint.resolve_trained_lora(
                lora_checkpoint_path, lora_lib.LoraConfig(**given), given=set(given)
            )
            self.lora_path, self.lora_config = trained.params_path, trained.config
            if not trained.recorded:
                logger.warning(
                    "LoRA: rank %d (%s), alpha %g (%s); the checkpoint records"
                    " neither: they must be the training run's.",
                    self.lora_config.rank,
                    "model_args" if "rank" in given else "default",
                    self.lora_config.alpha,
                    "model_args" if "alpha" in given else "default",
                )
            revision = model_revision(self.model_dir)
            if warning := trained.base_model_warning(
                revision, self.model_dir, "model_path in --model_args"
            ):
                logger.warning("%s", warning)
            lora_lib.load_trained_lora(model, trained)
        self.dtype = dtype
        self.sampler = Sampler(
            model,
            self.tokenizer,
            mesh=local_mesh(1),
            row_tile=int(row_tile) if row_tile is not None else None,
        )

    def generate_until(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[str]:
        """Each request's continuation, cut at its stop strings. Requests with
        the same generation settings are generated together."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        texts = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=MODEL_NAME)
        for indices in groups.values():
            params, stops = self._generation(requests[indices[0]].args[1])
            stream = self.sampler.generate_stream(
                [requests[i].args[0] for i in indices],
                params,
                example_ids=indices,
                batch_size=self.batch_size,
                stop_sequences=stop_token_sequences(stops, self.tokenizer),
            )
            for completions in stream:
                for c in completions:
                    texts[c.example_id] = cut_at_stop_sequences(c.text, stops)
                    self.cache_hook.add_partial(
                        "generate_until",
                        requests[c.example_id].args,
                        texts[c.example_id],
                    )
                bar.update(len(completions))
        bar.close()
        return texts

    def _generation(
        self, gen_kwargs: dict[str, Any]
    ) -> tuple[SamplingParams, list[str]]:
        """The sampling settings and stop strings of lm-eval's `gen_kwargs`."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        stops = with_eos_text(kwargs.pop("until"), self.tokenizer)
        max_gen_toks = kwargs.pop("max_gen_toks")
        unsupported = sorted(set(kwargs) - _SAMPLING_KWARGS)
        if unsupported:
            raise ValueError(
                f"{MODEL_NAME} does not support the generation settings"
                f" {unsupported}; it takes until, max_gen_toks and"
                f" {', '.join(sorted(_SAMPLING_KWARGS))}."
            )
        params = SamplingParams(
            max_generation_steps=max_gen_toks,
            temperature=float(kwargs.get("temperature", 0.0))
            if kwargs["do_sample"]
            else 0.0,
            top_p=float(kwargs.get("top_p") or 1.0),
            top_k=int(kwargs.get("top_k") or 0),
            seed=self.seed,
            eos_ids=self.eos_ids,
        )
        return params, stops

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(_ONLY_GENERATION)

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        raise NotImplementedError(_ONLY_GENERATION)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """lm-eval's `--apply_chat_template`, refused for pretrained models."""
        if not self.spec.instruction_tuned:
            raise ValueError(
                f"{self.spec.name} is pretrained only and never saw chat turns: drop"
                " --apply_chat_template."
            )
        return apply_chat_template(self.tokenizer, chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(self.model_dir).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records of the model in its results file."""
        return {
            "gsm8k_jax_model": self.spec.name,
            "model_dir": str(self.model_dir),
            "model_revision": model_revision(self.model_dir),
            "dtype": self.dtype,
            "lora_checkpoint": self.lora_path,
            "lora_config": dataclasses.asdict(self.lora_config)
            if self.lora_config
            else None,
            "row_tile": self.sampler.row_tile,
            "xla_gpu_autotune_level": recorded_autotune_level(),
        }


def register() -> None:
    """Makes `--model gsm8k_jax` known to lm-eval in this process (once: a
    second call, e.g. a second `main` in a notebook, changes nothing)."""
    if MODEL_NAME not in model_registry:
        model_registry.register(
            MODEL_NAME, target="gsm8k_jax.lm_eval_backend:GSM8KJaxLM"
        )


def offline_if_the_hub_is_unreachable() -> bool:
    """Turns on the hub libraries' offline mode where the hub's host name
    does not resolve (and no proxy is set, which might resolve it); returns
    whether it did.

    Downloads fail there anyway, but `datasets` first retries each of a
    task's files for about 25 s; offline it reads its cache at once (a
    cached task still runs) or fails at once."""
    import datasets
    import huggingface_hub.constants as hub

    # The environment's proxies and, on macOS and Windows, the system's.
    proxies = urllib.request.getproxies()
    if hub.HF_HUB_OFFLINE or proxies.get("https") or proxies.get("all"):
        return False
    try:
        socket.getaddrinfo(urllib.parse.urlsplit(hub.ENDPOINT).hostname, None)
        return False
    except (socket.gaierror, UnicodeError):
        hub.HF_HUB_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
        return True


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (`run --model gsm8k_jax ...`), our model
    registered; bad input is one line on stderr, exit status 1."""
    from lm_eval.__main__ import cli_evaluate

    fix_gpu_kernels()
    register()
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    went_offline = offline_if_the_hub_is_unreachable()
    try:
        cli_evaluate()
    except USER_ERRORS as e:
        unreachable = " (the hub's host does not resolve)" if went_offline else ""
        hint = (
            f" Offline{unreachable}, give lm-eval the task's data locally with"
            " --include_path (README: lm-eval offline)."
            if isinstance(e, ConnectionError)
            else ""
        )
        print(f"error: {e}{hint}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
