"""Soma-specific behaviour beyond the shared contract and reference tests."""

import keras
import numpy as np
import pytest
from helpers import make_stepper, modes_for_backend, random_gradient, to_numpy

import keras_soma
from keras_soma import _reference


def stepped(optimizer, start, gradients, mode="eager"):
    variable = keras.Variable(np.asarray(start, "float32"), name="weights")
    optimizer.build([variable])
    step = make_stepper(optimizer, [variable], mode)
    for gradient in gradients:
        step([np.asarray(gradient, "float32")])
    return variable


@pytest.mark.parametrize("momentum", [0.5, 0.95])  # Lion refuses beta = 0
def test_equals_keras_lion_with_equal_betas(momentum):
    """The paper check: Lion(lr, beta_1=b, beta_2=b) computes Soma's update."""
    rng = np.random.default_rng(0)
    start = rng.standard_normal((6, 4))
    gradients = [random_gradient(rng, (6, 4)) for _ in range(10)]
    soma = stepped(keras_soma.Soma(0.01, momentum=momentum), start, gradients)
    lion = stepped(
        keras.optimizers.Lion(0.01, beta_1=momentum, beta_2=momentum),
        start,
        gradients,
    )
    np.testing.assert_allclose(to_numpy(soma), to_numpy(lion), rtol=1e-6)
    assert not np.allclose(to_numpy(soma), start)


def test_momentum_zero_is_sign_sgd():
    rng = np.random.default_rng(1)
    start = rng.standard_normal((5,))
    gradient = random_gradient(rng, (5,))
    variable = stepped(keras_soma.Soma(0.1, momentum=0.0), start, [gradient])
    np.testing.assert_allclose(
        to_numpy(variable), start - 0.1 * np.sign(gradient), rtol=1e-6
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_momentum_is_stored_in_that_dtype(dtype):
    variable = keras.Variable(np.zeros((3, 3), "float32"))
    optimizer = keras_soma.Soma(momentum_dtype=dtype)
    optimizer.build([variable])
    slot = optimizer.get_slots(variable)["momentum"]
    assert keras.backend.standardize_dtype(slot.dtype) == dtype
    assert tuple(slot.shape) == (3, 3)


@pytest.mark.parametrize("mode", modes_for_backend())
def test_nan_gradient_poisons_the_parameter_without_skip(mode):
    gradient = np.array([np.nan, 1.0, -1.0], "float32")
    variable = stepped(keras_soma.Soma(0.1), np.zeros(3), [gradient], mode)
    values = to_numpy(variable)
    assert np.isnan(values[0])
    np.testing.assert_allclose(values[1:], [-0.1, 0.1])


@pytest.mark.parametrize("mode", modes_for_backend())
def test_inf_gradient_sticks_the_direction_without_skip(mode):
    """+Inf makes the average +Inf for good: the parameter keeps moving
    down by lr, whatever later (finite) gradients say."""
    gradients = [[np.inf], [-1.0], [-1.0]]
    optimizer = keras_soma.Soma(0.1)
    variable = stepped(optimizer, [0.0], gradients, mode)
    np.testing.assert_allclose(to_numpy(variable), [-0.3], rtol=1e-6)
    assert np.isposinf(to_numpy(optimizer.get_slots(variable)["momentum"])[0])


@pytest.mark.parametrize("mode", modes_for_backend())
def test_skip_nonfinite_leaves_everything_untouched_and_counts(mode):
    rng = np.random.default_rng(2)
    start = rng.standard_normal((4,))
    good = [random_gradient(rng, (4,)) for _ in range(3)]
    bad = good[0].copy()
    bad[2] = np.nan
    optimizer = keras_soma.Soma(0.1, skip_nonfinite=True, weight_decay=0.1)
    variable = keras.Variable(start.astype("float32"))
    optimizer.build([variable])
    step = make_stepper(optimizer, [variable], mode)

    step([good[0]])
    before = to_numpy(variable).copy()
    state_before = to_numpy(optimizer.get_slots(variable)["momentum"]).copy()
    step([bad])
    np.testing.assert_array_equal(to_numpy(variable), before)
    np.testing.assert_array_equal(
        to_numpy(optimizer.get_slots(variable)["momentum"]), state_before
    )
    assert int(to_numpy(optimizer.skipped_steps)) == 1
    step([good[1]])
    assert int(to_numpy(optimizer.skipped_steps)) == 1

    # The same run without the bad step, by the reference.
    expected, state = start.astype("float32"), _reference.soma_init(start)
    for gradient in good[:2]:
        expected, state = _reference.soma_step(
            expected, gradient, state, 0.1, weight_decay=0.1
        )
    np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)


def test_skipped_steps_is_none_when_option_is_off():
    assert keras_soma.Soma().skipped_steps is None
