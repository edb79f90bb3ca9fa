"""GPU kernels chosen by rule, not by timing: the scripts turn XLA's
autotuner off before JAX starts, unless XLA_FLAGS sets a level, and every
run on a GPU records the level it ran with."""

import os

import jax
import pytest

from gsm8k_jax import kernel_choice


@pytest.mark.parametrize(
    "given, expected_flags, level",
    [
        (None, "--xla_gpu_autotune_level=0", 0),
        ("--xla_dump_to=/tmp/d", "--xla_dump_to=/tmp/d --xla_gpu_autotune_level=0", 0),
        ("--xla_gpu_autotune_level=4", "--xla_gpu_autotune_level=4", 4),
    ],
)
def test_autotuning_is_turned_off_unless_the_user_set_a_level(
    monkeypatch, given, expected_flags, level
):
    if given is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
        assert kernel_choice.gpu_autotune_level() == 4  # XLA's default.
    else:
        monkeypatch.setenv("XLA_FLAGS", given)
    kernel_choice.fix_gpu_kernels()
    kernel_choice.fix_gpu_kernels()  # Once only.
    assert kernel_choice.gpu_autotune_level() == level
    assert os.environ["XLA_FLAGS"] == expected_flags


def test_only_a_gpu_run_records_its_level(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=2")
    assert kernel_choice.recorded_autotune_level() is None  # CPU: no autotuning.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert kernel_choice.recorded_autotune_level() == 2
