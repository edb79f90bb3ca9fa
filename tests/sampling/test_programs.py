"""Programs compiled ahead of time: nothing runs, one executable per shape."""

import jax
import jax.numpy as jnp
import numpy as np

from gsm8k_jax.sampling.programs import Program, compile_all


def _counting_program(calls: list):
    def double(x, *, offset):
        jax.debug.callback(lambda: calls.append(1))
        return 2 * x + offset

    return Program(double, static_argnames="offset", donate_argnums=0)


def test_compiling_runs_nothing_and_calls_reuse_the_executable():
    calls = []
    program = _counting_program(calls)
    x = jnp.arange(4.0)
    program.compile(x, offset=1)
    assert not calls and not x.is_deleted()  # not run, donated input intact
    assert program.num_executables == 1
    np.testing.assert_array_equal(program(x, offset=1), [1.0, 3.0, 5.0, 7.0])
    assert calls == [1] and program.num_executables == 1
    program(jnp.ones(4), offset=1)  # same shape: same executable
    assert program.num_executables == 1
    program(jnp.ones(5), offset=1)  # new shape, and new static argument
    program(jnp.ones(5), offset=2)
    program(np.ones(5, np.int32), offset=2)  # new dtype
    assert program.num_executables == 4


def test_compile_all_compiles_each_new_call_once():
    calls = []
    first, second = _counting_program(calls), _counting_program(calls)
    x, y = jnp.ones(3), jnp.ones((2, 2))
    compile_all(
        [
            (first, (x,), {"offset": 0}),
            (first, (x,), {"offset": 0}),  # the same call twice
            (first, (y,), {"offset": 0}),
            (second, (x,), {"offset": 1}),
        ]
    )
    assert not calls
    assert (first.num_executables, second.num_executables) == (2, 1)
    np.testing.assert_array_equal(second(x, offset=1), [3.0, 3.0, 3.0])
    compile_all([(second, (jnp.zeros(3),), {"offset": 1})])  # already there
    assert second.num_executables == 1
