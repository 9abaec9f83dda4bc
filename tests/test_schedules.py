"""keras_soma.schedules.WarmupCooldown: values, configuration, bad
arguments, and use inside keras_soma optimizers during fit()."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from helpers import to_numpy

import keras_soma
from keras_soma.schedules import WarmupCooldown


def formula(
    step, learning_rate, warmup_steps=0, power=2.0, total_steps=None, cooldown_steps=0
):
    """The documented schedule, in float64 numpy."""
    step = np.asarray(step, "float64")
    rate = np.full(step.shape, learning_rate)
    if warmup_steps:
        rate = rate * np.minimum(1.0, (step / warmup_steps) ** power)
    if cooldown_steps:
        rate = rate * np.clip((total_steps - step) / cooldown_steps, 0.0, 1.0)
    return rate


CONFIGS = [
    {"learning_rate": 0.1, "warmup_steps": 10},
    {"learning_rate": 0.1, "warmup_steps": 10, "power": 1.0},
    {
        "learning_rate": 3e-4,
        "warmup_steps": 7,
        "power": 0.5,
        "total_steps": 40,
        "cooldown_steps": 12,
    },
    {"learning_rate": 2.0, "total_steps": 30, "cooldown_steps": 30},
    {"learning_rate": 0.5, "warmup_steps": 20, "total_steps": 20},
    {"learning_rate": 0.5},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_values_follow_the_formula(config):
    schedule = WarmupCooldown(**config)
    steps = np.arange(0, 60)
    actual = np.array([float(to_numpy(schedule(step))) for step in steps])
    np.testing.assert_allclose(actual, formula(steps, **config), rtol=1e-6, atol=1e-12)


def test_values_by_hand():
    schedule = WarmupCooldown(0.1, warmup_steps=10, total_steps=100, cooldown_steps=20)
    # warm-up (t / 10)^2: t=0 -> 0, t=5 -> 0.25; plateau from t=10 to 80;
    # cool-down (100 - t) / 20: t=90 -> 0.5, t=99 -> 0.05, t>=100 -> 0.
    for step, expected in [
        (0, 0.0),
        (5, 0.025),
        (10, 0.1),
        (50, 0.1),
        (80, 0.1),
        (90, 0.05),
        (99, 0.005),
        (100, 0.0),
        (150, 0.0),
    ]:
        # float32 values: equal to the decimal ones to within 1e-7 relative.
        assert float(to_numpy(schedule(step))) == pytest.approx(
            expected, rel=1e-6, abs=1e-9
        ), step


def test_accepts_a_tensor_step():
    schedule = WarmupCooldown(1.0, warmup_steps=4)
    value = schedule(keras.ops.convert_to_tensor(2, "int32"))
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert float(to_numpy(value)) == pytest.approx(0.25)


def test_config_round_trip():
    schedule = WarmupCooldown(
        0.2, warmup_steps=5, power=1.5, total_steps=50, cooldown_steps=5, name="ramp"
    )
    config = schedule.get_config()
    assert config == {
        "learning_rate": 0.2,
        "warmup_steps": 5,
        "power": 1.5,
        "total_steps": 50,
        "cooldown_steps": 5,
        "name": "ramp",
    }
    assert WarmupCooldown.from_config(config).get_config() == config
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(schedule)))
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is WarmupCooldown
    assert restored.get_config() == config
    assert (
        keras.saving.get_registered_name(WarmupCooldown) == "keras_soma>WarmupCooldown"
    )


@pytest.mark.parametrize(
    "optimizer_class", [keras_soma.SM3, keras_soma.Soma, keras.optimizers.Adam]
)
def test_round_trip_inside_an_optimizer(optimizer_class):
    schedule = WarmupCooldown(0.05, warmup_steps=3, total_steps=10, cooldown_steps=2)
    optimizer = optimizer_class(learning_rate=schedule)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(optimizer)))
    restored = keras.saving.deserialize_keras_object(config)
    # On PyTorch, Keras swaps its own optimizers for torch subclasses.
    assert isinstance(restored, optimizer_class)
    assert type(restored) is type(optimizer)
    assert restored.get_config()[
        "learning_rate"
    ] == keras.saving.serialize_keras_object(schedule)
    restored.build([keras.Variable(np.zeros((2,), "float32"))])
    restored.iterations.assign(4)
    # t = 4 is on the plateau (warm-up ends at 3, cool-down starts at 8).
    assert float(to_numpy(restored.learning_rate)) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": "high"}, "learning_rate"),
        ({"learning_rate": 0.1, "warmup_steps": -1}, "warmup_steps"),
        ({"learning_rate": 0.1, "warmup_steps": 2.5}, "warmup_steps"),
        ({"learning_rate": 0.1, "power": 0.0}, "power"),
        ({"learning_rate": 0.1, "power": -2.0}, "power"),
        ({"learning_rate": 0.1, "total_steps": 0}, "total_steps"),
        (
            {"learning_rate": 0.1, "cooldown_steps": -3, "total_steps": 10},
            "cooldown_steps",
        ),
        ({"learning_rate": 0.1, "cooldown_steps": 5}, "total_steps"),
        (
            {
                "learning_rate": 0.1,
                "warmup_steps": 6,
                "cooldown_steps": 5,
                "total_steps": 10,
            },
            "warmup_steps",
        ),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, argument):
    with pytest.raises(ValueError) as raised:
        WarmupCooldown(**kwargs)
    message = str(raised.value)
    assert f"`{argument}`" in message
    assert f"{argument}={kwargs.get(argument)!r}" in message


class RateRecorder(keras.callbacks.Callback):
    """The optimizer's step and learning rate before every batch."""

    def __init__(self):
        super().__init__()
        self.steps, self.rates = [], []

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        self.steps.append(int(to_numpy(optimizer.iterations)))
        self.rates.append(float(to_numpy(optimizer.learning_rate)))


@pytest.mark.parametrize("optimizer_class", [keras_soma.SM3, keras_soma.Soma])
def test_fit_follows_the_schedule_and_trains(optimizer_class):
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((64, 4)).astype("float32")
    targets = inputs @ np.array([[0.5], [-1.0], [0.25], [1.5]], "float32")
    epochs, batch_size = 6, 8
    total = epochs * 64 // batch_size
    learning_rate = 0.5 if optimizer_class is keras_soma.SM3 else 0.05
    schedule = WarmupCooldown(
        learning_rate, warmup_steps=6, total_steps=total, cooldown_steps=8
    )
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer_class(learning_rate=schedule), loss="mse")
    before = model.evaluate(inputs, targets, verbose=0)
    recorder = RateRecorder()
    model.fit(
        inputs,
        targets,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=[recorder],
        verbose=0,
    )
    assert recorder.steps == list(range(total))
    np.testing.assert_allclose(
        recorder.rates,
        formula(
            recorder.steps,
            learning_rate,
            warmup_steps=6,
            total_steps=total,
            cooldown_steps=8,
        ),
        rtol=1e-6,
        atol=1e-12,
    )
    assert float(to_numpy(model.optimizer.learning_rate)) == 0.0  # t = total_steps
    assert model.evaluate(inputs, targets, verbose=0) < 0.25 * before
