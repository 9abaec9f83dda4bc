"""The blockwise int8 momentum (`keras_soma._quantize`), for every
optimizer that offers it (`momentum_dtype="int8"`): its state survives
Keras's saving, and state of another format is refused whole. The
formats' arithmetic is checked against the numpy reference by the
reference and property suites (the registry's int8 rows)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import make_stepper, to_numpy

import keras_soma

OPTIMIZERS = [
    pytest.param(keras_soma.Soma, id="Soma"),
    pytest.param(keras_soma.SM3, id="SM3"),
]


@pytest.mark.parametrize(
    "saved,loading", [("float32", "int8"), ("int8", "float32"), ("bfloat16", "int8")]
)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_state_of_another_momentum_dtype_is_refused_whole(
    optimizer_class, saved, loading
):
    """Loading float32 state into an int8 optimizer, or the reverse,
    raises before anything is assigned."""
    rng = np.random.default_rng(6)
    variables = [
        keras.Variable(rng.standard_normal(shape).astype("float32"))
        for shape in [(6, 4), (4,)]
    ]
    source = optimizer_class(0.01, momentum_dtype=saved)
    source.build(variables)
    step = make_stepper(source, variables, "eager")
    step([rng.standard_normal(tuple(v.shape)).astype("float32") for v in variables])
    store = {}
    source.save_own_variables(store)

    target = optimizer_class(0.01, momentum_dtype=loading)
    target.build(variables)
    before = [to_numpy(v).copy() for v in target.variables]
    with pytest.raises(ValueError, match="Cannot load optimizer state"):
        target.load_own_variables(store)
    for value, old in zip(target.variables, before):
        np.testing.assert_array_equal(to_numpy(value), old)


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_int8_state_survives_keras_save_and_load(optimizer_class, tmp_path):
    rng = np.random.default_rng(7)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=optimizer_class(0.01, momentum_dtype="int8", block_size=4),
        loss="mse",
    )
    inputs = rng.standard_normal((32, 5)).astype("float32")
    targets = rng.standard_normal((32, 3)).astype("float32")
    model.fit(inputs, targets, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    config = restored.optimizer.get_config()
    assert config["momentum_dtype"] == "int8" and config["block_size"] == 4
    for variable, twin in zip(model.trainable_variables, restored.trainable_variables):
        original = model.optimizer.get_slots(variable)
        loaded = restored.optimizer.get_slots(twin)
        assert "momentum_scale" in original and sorted(original) == sorted(loaded)
        for name in original:
            np.testing.assert_array_equal(
                to_numpy(loaded[name]), to_numpy(original[name])
            )
            assert to_numpy(original[name]).any(), name
