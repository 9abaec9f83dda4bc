"""GradSign-specific behaviour: the int8 counter's bounds, zero and
non-finite gradients."""

import keras
import numpy as np
import pytest
from helpers import make_stepper, modes_for_backend, to_numpy

import keras_soma
from keras_soma import _reference
from keras_soma.gradsign import COUNTER_MAX, COUNTER_MIN

SIGNS = (-1.0, 0.0, 1.0)


def reachable_counters():
    """Every counter value reachable from 0 under any sign sequence."""
    reachable, frontier = {0}, [0]
    while frontier:
        value = frontier.pop()
        for sign in SIGNS:
            successor = int(
                _reference.gradsign_counter_update(
                    np.array([value], np.int8), np.array([sign], np.float32)
                )[0]
            )
            if successor not in reachable:
                reachable.add(successor)
                frontier.append(successor)
    return reachable


def test_counter_stays_inside_int8_for_every_reachable_state():
    reachable = reachable_counters()
    assert min(reachable) == COUNTER_MIN == -61
    assert max(reachable) == COUNTER_MAX == 60
    assert all(-128 <= value <= 127 for value in reachable)


@pytest.mark.parametrize("mode", modes_for_backend())
def test_counter_map_equals_reference_on_every_int8_value(mode):
    """All 256 int8 counters x 3 gradient signs in one step, no overflow
    (values outside the reachable range included)."""
    counters = np.repeat(np.arange(-128, 128, dtype=np.int8), len(SIGNS))
    gradients = np.tile(np.array(SIGNS, np.float32), 256)
    reachable = (counters >= COUNTER_MIN) & (counters <= COUNTER_MAX)
    variable = keras.Variable(np.zeros(counters.shape, "float32"))
    optimizer = keras_soma.GradSign(learning_rate=1.0)
    optimizer.build([variable])
    optimizer.get_slots(variable)["sign_counter"].assign(counters)
    make_stepper(optimizer, [variable], mode)([gradients])
    expected = _reference.gradsign_counter_update(counters, gradients)
    actual = to_numpy(optimizer.get_slots(variable)["sign_counter"])
    np.testing.assert_array_equal(actual[reachable], expected[reachable])
    assert actual[reachable].min() >= COUNTER_MIN
    assert actual[reachable].max() <= COUNTER_MAX
    np.testing.assert_allclose(
        to_numpy(variable)[reachable], -expected[reachable] / 64.0
    )


@pytest.mark.parametrize("mode", modes_for_backend())
def test_zero_gradient_never_moves_a_fresh_parameter(mode):
    variable = keras.Variable(np.full((3, 2), 0.5, "float32"))
    optimizer = keras_soma.GradSign(learning_rate=0.1)
    optimizer.build([variable])
    step = make_stepper(optimizer, [variable], mode)
    for _ in range(20):
        step([np.zeros((3, 2), "float32")])
    np.testing.assert_array_equal(to_numpy(variable), np.full((3, 2), 0.5))
    assert not to_numpy(optimizer.get_slots(variable)["sign_counter"]).any()


@pytest.mark.parametrize("mode", modes_for_backend())
def test_nan_counts_as_zero_and_inf_as_its_sign(mode):
    gradient = np.array([np.nan, np.inf, -np.inf, 2.0], "float32")
    variable = keras.Variable(np.zeros(4, "float32"))
    optimizer = keras_soma.GradSign(learning_rate=1.0)
    optimizer.build([variable])
    make_stepper(optimizer, [variable], mode)([gradient])
    counter = to_numpy(optimizer.get_slots(variable)["sign_counter"])
    np.testing.assert_array_equal(counter, [0, 8, -8, 8])
    np.testing.assert_allclose(to_numpy(variable), [0.0, -0.125, 0.125, -0.125])
    assert np.isfinite(to_numpy(variable)).all()


def test_state_is_one_int8_per_parameter():
    variable = keras.Variable(np.zeros((7, 5), "float32"))
    optimizer = keras_soma.GradSign()
    optimizer.build([variable])
    (counter,) = optimizer.get_slots(variable).values()
    assert keras.backend.standardize_dtype(counter.dtype) == "int8"
    assert tuple(counter.shape) == (7, 5)
