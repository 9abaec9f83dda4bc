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


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the parts are TensorFlow's")
def test_int8_step_parts_composed_step_is_the_library_step():
    """The composed int8 step `int8_step_parts.py` times against its parts
    is the library's: one step of each from the same start leaves the
    same variables and the same codes and scales."""
    import int8_step_parts

    import keras_soma

    shapes = [(4, 128), (2, 256)]
    variables, gradients = step_speed.make_problem(shapes, "float32", seed=5)
    twins = [keras.Variable(keras.ops.convert_to_numpy(v.value)) for v in variables]
    functions, codes, scales = int8_step_parts.parts(variables, gradients, 128)
    functions["int8 step, composed (dequantize, update, quantize)"]()
    optimizer = keras_soma.Soma(
        learning_rate=int8_step_parts.LEARNING_RATE,
        momentum=int8_step_parts.MOMENTUM,
        momentum_dtype="int8",
        block_size=128,
    )
    optimizer.build(twins)
    step_speed.tensorflow_step(optimizer, twins, gradients, xla=False)()
    for value, twin in zip(variables, twins):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(value.value),
            keras.ops.convert_to_numpy(twin.value),
        )
    for code, scale, twin in zip(codes, scales, twins):
        slots = optimizer.get_slots(twin)
        assert np.any(code.numpy() != 0)
        for got, name in ((code, "momentum"), (scale, "momentum_scale")):
            np.testing.assert_array_equal(
                got.numpy(), keras.ops.convert_to_numpy(slots[name].value)
            )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the parts are TensorFlow's")
def test_int8_step_parts_short_run_writes_every_row(tmp_path):
    import int8_step_parts

    output = tmp_path / "parts.md"
    ratios = int8_step_parts.main(
        [
            "--rows",
            "64",
            "--columns",
            "64",
            "--variables",
            "2",
            "--steps",
            "2",
            "--repeats",
            "2",
            "--output",
            str(output),
        ]
    )
    assert len(ratios) == 7
    assert ratios["Soma float32, the library's step"] == 1.0
    assert all(np.isfinite(ratio) and ratio > 0 for ratio in ratios.values())
    text = output.read_text()
    for name in ratios:
        assert f"| {name} |" in text, text
    assert "Produced by `python benchmarks/int8_step_parts.py --rows 64" in text


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--rows", "0"], "--rows must be an integer >= 1; received 0"),
        (["--block-size", "-2"], "--block-size must be an integer >= 1; received -2"),
        (
            ["--rows", "3", "--columns", "5", "--block-size", "4"],
            "must be a multiple of --block-size",
        ),
    ],
)
def test_int8_step_parts_bad_arguments_are_named(arguments, message, capsys):
    import int8_step_parts

    with pytest.raises(SystemExit):
        int8_step_parts.parse_args(arguments)
    assert message in capsys.readouterr().err
