"""keras_soma.monitoring.SkippedSteps: skipped steps as a fit metric."""

import keras
import numpy as np
import pytest
from registry import REGISTRY

import keras_soma
from keras_soma.monitoring import SkippedSteps


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_skipped_steps_are_logged_per_epoch(name):
    spec = REGISTRY[name]
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((64, 4)).astype("float32")
    targets = rng.standard_normal((64, 1)).astype("float32")
    targets[[5, 40]] = np.nan  # batches 0 and 2 (batch size 16) get NaN gradients
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=spec.cls(learning_rate=0.01, skip_nonfinite=True), loss="mse"
    )
    history = model.fit(
        inputs,
        targets,
        epochs=2,
        batch_size=16,
        shuffle=False,
        verbose=0,
        callbacks=[SkippedSteps()],
    )
    assert history.history["skipped_steps"] == [2, 4]
    for weight in model.weights:
        assert np.isfinite(keras.ops.convert_to_numpy(weight)).all()


def test_clear_error_without_the_option():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_soma.Soma(), loss="mse")
    with pytest.raises(ValueError, match="skip_nonfinite=True"):
        model.fit(
            np.zeros((4, 2)), np.zeros((4, 1)), verbose=0, callbacks=[SkippedSteps()]
        )
