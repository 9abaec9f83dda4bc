"""Every optimizer against its numpy reference (keras_soma._reference):
>= 10 random steps on 0-D, 1-D, 2-D and 4-D variables, each step checking
the variable and every state slot, in every execution mode."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import (
    TOLERANCE,
    assert_state_close,
    make_optimizer,
    make_stepper,
    modes_for_backend,
    random_gradient,
    to_numpy,
)
from registry import CONTRACT_ROWS

import keras_soma
from keras_soma._reference import numpy_dtype

SHAPES = [(), (7,), (5, 3), (2, 3, 2, 4)]
STEPS = 12
LEARNING_RATE = 0.01

CASES = [
    pytest.param(
        spec,
        case,
        id=f"{name}-{'-'.join(f'{k}={v}' for k, v in case.items()) or 'defaults'}",
    )
    for name, spec in CONTRACT_ROWS.items()
    for case in spec.reference_cases
]
DEFAULT_CASES = [
    pytest.param(spec, spec.reference_cases[0], id=name)
    for name, spec in CONTRACT_ROWS.items()
]


def run_against_reference(
    spec,
    case,
    shape,
    dtype,
    mode,
    steps=STEPS,
    weight_decay=None,
    seed=0,
    gradient_scale=1.0,
):
    rng = np.random.default_rng(seed)
    initial = rng.standard_normal(shape).astype(np.float32).astype(numpy_dtype(dtype))
    variable = keras.Variable(initial, dtype=dtype, name="weights")
    kwargs = dict(case, learning_rate=LEARNING_RATE)
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    optimizer = make_optimizer(spec, mode, **kwargs)
    optimizer.build([variable])
    step = make_stepper(optimizer, [variable], mode)

    expected = initial.copy()
    state = spec.reference_init(expected, **case)
    assert_state_close(optimizer, variable, state, dtype, "after build")
    for index in range(steps):
        gradient = random_gradient(rng, shape, dtype, scale=gradient_scale)
        step([gradient])
        expected, state = spec.reference_step(
            expected, gradient, state, LEARNING_RATE, weight_decay=weight_decay, **case
        )
        actual = to_numpy(variable)
        assert actual.dtype == expected.dtype
        tolerance = atol = TOLERANCE[dtype]
        if (
            mode == "compiled"
            and case.get("momentum_dtype") in ("bfloat16", "float16")
            and spec.cls is keras_soma.SM3
        ):
            # A compiler may skip rounding an intermediate to bfloat16 or
            # float16: inductor does (torch._inductor.config.
            # emulate_precision_casts is off), and so did XLA in
            # TensorFlow 2.16 (xla_allow_excess_precision; CI's oldest-Keras
            # stage), not in 2.21. SM3's compiled step then moves by the
            # momentum before its rounding to the stored dtype: at most
            # lr * 2**-8 (|m| <= 1) per step (measured 4.9e-6 after 2-3
            # steps at lr 0.01, bfloat16, on both).
            atol = max(tolerance, LEARNING_RATE * 2**-8 * (index + 1))
        np.testing.assert_allclose(
            actual.astype(np.float64),
            expected.astype(np.float64),
            rtol=tolerance,
            atol=atol,
            err_msg=f"variable after step {index + 1}",
        )
        assert_state_close(optimizer, variable, state, dtype, f"after step {index + 1}")
    return optimizer, variable


@pytest.mark.parametrize("mode", modes_for_backend())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"rank{len(s)}")
@pytest.mark.parametrize("spec,case", CASES)
def test_float32_matches_reference(spec, case, shape, mode):
    if (
        keras.backend.backend() == "torch"
        and mode == "compiled"
        and case.get("momentum_dtype") == "int8"
        and case != spec.reference_cases[0]
        and len(shape) != 2
    ):
        # Measured: torch.compile (inductor, CPU) takes 30-40 s to compile
        # each blockwise int8 step, some 9 minutes for every case at every
        # rank. The first case runs at every rank, the others at rank 2;
        # eager mode runs them all.
        pytest.skip("int8 cases other than the first: rank 2 only when compiled")
    run_against_reference(spec, case, shape, "float32", mode)


@pytest.mark.parametrize("mode", modes_for_backend())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("spec,case", DEFAULT_CASES)
def test_half_precision_matches_reference(spec, case, dtype, mode):
    optimizer, variable = run_against_reference(spec, case, (6, 5), dtype, mode)
    assert keras.backend.standardize_dtype(variable.dtype) == dtype


@pytest.mark.parametrize("mode", modes_for_backend())
@pytest.mark.parametrize("spec,case", DEFAULT_CASES)
def test_weight_decay_matches_reference(spec, case, mode):
    run_against_reference(spec, case, (4, 3), "float32", mode, weight_decay=0.5)
