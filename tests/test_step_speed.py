"""The step-speed benchmark's floors: what they move, on each backend.

Times are not asserted (a shared machine makes any timed assertion flaky;
the targets live in `benchmarks/step_speed.py`). What is asserted is that
a floor does the work it stands for: it reads every variable, gradient and
state tensor and writes the variables and the state, float32 and int8
state alike, so that "x floor" compares a step with a copy of its bytes.
"""

from __future__ import annotations

import os
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import step_speed  # noqa: E402

BACKEND = keras.backend.backend()
FLOORS = {
    "tensorflow": step_speed.tensorflow_floor,
    "jax": step_speed.jax_floor,
    "torch": step_speed.torch_floor,
}


def test_floor_moves_every_variable_and_state_tensor():
    shapes = [(3, 5), (7,)]
    variables, gradients = step_speed.make_problem(shapes, "float32", seed=3)
    before = [keras.ops.convert_to_numpy(v.value) for v in variables]
    state = [
        keras.Variable(np.zeros(shape, dtype), dtype=dtype, trainable=False)
        for shape, dtype in zip(shapes, ("float32", "int8"))
    ]
    floor = FLOORS[BACKEND](state, variables, gradients)
    floor()
    result = floor()
    if BACKEND == "jax":
        # The JAX floor runs on donated copies of the values it was given
        # and returns them, variables then state.
        tensors = [np.asarray(value) for value in result]
    else:
        tensors = [keras.ops.convert_to_numpy(v.value) for v in variables + state]
    moved, counts = tensors[: len(shapes)], tensors[len(shapes) :]
    for value, start, gradient in zip(moved, before, gradients):
        want = start + 2 * keras.ops.convert_to_numpy(gradient)
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-6)
    assert [count.dtype for count in counts] == [np.float32, np.int8]
    for count in counts:
        np.testing.assert_array_equal(count, np.full(count.shape, 2, count.dtype))


@pytest.mark.skipif(BACKEND != "torch", reason="the eager floor is torch's")
def test_torch_floor_runs_eagerly():
    # A torch.compile'd floor put int8 state's copy above GradSign's own
    # eager step (Inductor's int8 loop); the floor is eager in-place ops.
    import torch

    variables, gradients = step_speed.make_problem([(4, 4)], "float32")
    state = [keras.Variable(np.zeros((4, 4), "int8"), dtype="int8", trainable=False)]
    floor = step_speed.torch_floor(state, variables, gradients)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    floor()
    assert torch._dynamo.utils.counters["frames"]["total"] == 0
    # The same counter sees a torch.compile'd function, so the check can fail.
    torch.compile(floor)()
    assert torch._dynamo.utils.counters["frames"]["total"] > 0
