"""Tests for `keras_soma.callbacks.PolyakAveraging`.

The expected averages come from a plain numpy reference over the weights a
recording callback saw after every call of the train function; resume
tests compare a crashed-and-restarted run with an uninterrupted one bit for
bit (everything runs on CPU, where Keras's training is deterministic).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import LOGICAL_CPUS, requires_tensorflow

import keras_soma
from keras_soma.callbacks import PolyakAveraging

SAMPLES = 24
BATCH_SIZE = 4
STEPS_PER_EPOCH = SAMPLES // BATCH_SIZE  # 6

# (PolyakAveraging arguments) for the three averaging modes.
MODES = {
    "exponential": dict(decay=0.8),
    "dynamic": dict(decay=0.95, dynamic_decay=True),
    "uniform": dict(decay=None),
}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def make_data(seed=0, samples=SAMPLES):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 3)).astype("float32")
    y = np.stack([x[:, 0] - 2 * x[:, 1], x[:, 2] * x[:, 0]], axis=1)
    return x, y.astype("float32")


def make_model(seed=7, steps_per_execution=1, learning_rate=0.05):
    """A tiny MLP; the same seed gives the same initial weights."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    return model


def to_numpy(value):
    return np.array(keras.ops.convert_to_numpy(value))


def weights_of(model):
    return [to_numpy(variable) for variable in model.trainable_variables]


def optimizer_state_of(model):
    return [to_numpy(variable) for variable in model.optimizer.variables]


class WeightRecorder(keras.callbacks.Callback):
    """Records (optimizer iterations, trainable weights) at train begin and
    after every call of the train function."""

    def __init__(self):
        super().__init__()
        self.records = []

    def _record(self):
        model = self.model  # On JAX this writes fit's state back first.
        self.records.append(
            (int(to_numpy(model.optimizer.iterations)), weights_of(model))
        )

    def on_train_begin(self, logs=None):
        self._record()

    def on_train_batch_end(self, batch, logs=None):
        self._record()

    def weights_at(self, iteration):
        matches = [w for step, w in self.records if step == iteration]
        assert matches, f"no weights recorded at iteration {iteration}"
        return matches[0]


def numpy_average(initial, samples, decay, dynamic_decay=False):
    """The reference: `avg <- d * avg + (1 - d) * w` from `initial` over
    `samples`, with d = decay or min(decay, (1 + t) / (10 + t)); the plain
    mean of `samples` for decay=None."""
    if decay is None:
        return [
            np.mean(np.stack([sample[i] for sample in samples]).astype(np.float64), 0)
            for i in range(len(samples[0]))
        ]
    average = [value.astype(np.float64) for value in initial]
    for updates_so_far, sample in enumerate(samples):
        d = decay
        if dynamic_decay:
            d = min(decay, (1 + updates_so_far) / (10 + updates_so_far))
        average = [d * a + (1 - d) * w for a, w in zip(average, sample)]
    return average


def assert_all_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def assert_bitwise_equal(actual, expected, what=""):
    assert len(actual) == len(expected), what
    for index, (a, e) in enumerate(zip(actual, expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, (what, index)
        assert a.tobytes() == e.tobytes(), f"{what} #{index} differs"


def state_of(averaging):
    """The averaging state as numpy values (read outside `averaged()`)."""
    return {
        "averages": [to_numpy(average) for average in averaging.averages],
        "num_updates": averaging.num_updates,
        "last_step": averaging.last_step,
    }


def assert_states_equal(first, second):
    assert first["num_updates"] == second["num_updates"]
    assert first["last_step"] == second["last_step"]
    assert_bitwise_equal(first["averages"], second["averages"], "averages")


def fit(model, callbacks, epochs=2, x=None, y=None, **kwargs):
    if x is None:
        x, y = make_data()
    return model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **kwargs,
    )


# ---------------------------------------------------------------------------
# The averages against numpy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_averages_match_numpy(mode):
    model = make_model()
    recorder = WeightRecorder()
    averaging = PolyakAveraging(**MODES[mode])
    fit(model, [recorder, averaging], epochs=2)

    steps = 2 * STEPS_PER_EPOCH
    initial = recorder.weights_at(0)
    samples = [recorder.weights_at(step) for step in range(1, steps + 1)]
    expected = numpy_average(initial, samples, **MODES[mode])
    state = state_of(averaging)
    assert_all_close(state["averages"], expected)
    assert state["num_updates"] == averaging.num_updates == steps
    assert state["last_step"] == steps
    # The average is not simply the last weights.
    assert not np.allclose(state["averages"][0], weights_of(model)[0])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_start_step_and_update_every(mode):
    model = make_model()
    recorder = WeightRecorder()
    averaging = PolyakAveraging(start_step=4, update_every=3, **MODES[mode])
    fit(model, [recorder, averaging], epochs=2)  # 12 steps

    # Starts from the weights after step 4, then updates after 7 and 10.
    expected = numpy_average(
        recorder.weights_at(4),
        [recorder.weights_at(7), recorder.weights_at(10)],
        **MODES[mode],
    )
    state = state_of(averaging)
    assert_all_close(state["averages"], expected)
    assert state["num_updates"] == 2
    assert state["last_step"] == 10


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras's PyTorch backend allows only steps_per_execution=1",
)
@pytest.mark.parametrize("update_every, sampled", [(1, [3, 6, 9, 12]), (4, [6, 12])])
def test_steps_per_execution_averages_execution_ends(update_every, sampled):
    model = make_model(steps_per_execution=3)
    recorder = WeightRecorder()
    averaging = PolyakAveraging(
        decay=0.9, dynamic_decay=True, update_every=update_every
    )
    fit(model, [recorder, averaging], epochs=2)

    # on_train_batch_end fires once per execution of 3 steps: the callback
    # sees the weights after steps 3, 6, 9, 12 only.
    assert [step for step, _ in recorder.records] == [0, 3, 6, 9, 12]
    expected = numpy_average(
        recorder.weights_at(0),
        [recorder.weights_at(step) for step in sampled],
        decay=0.9,
        dynamic_decay=True,
    )
    state = state_of(averaging)
    assert_all_close(state["averages"], expected)
    assert state["num_updates"] == len(sampled)
    assert state["last_step"] == sampled[-1]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras_soma.Soma(0.01, gradient_accumulation_steps=2),
        lambda: keras.optimizers.Adam(0.05, gradient_accumulation_steps=2),
    ],
    ids=["soma", "keras-adam"],
)
def test_gradient_accumulation_averages_once_per_optimizer_step(make_optimizer):
    # With accumulation Keras's `iterations` is computed from the
    # micro-step counter each time it is read (not a variable); the
    # callback must read it at every check, and on every backend.
    model = make_model()
    model.compile(optimizer=make_optimizer(), loss="mse")
    recorder = WeightRecorder()
    averaging = PolyakAveraging(decay=0.8)
    fit(model, [recorder, averaging], epochs=2)  # 12 micro-steps

    steps = 2 * STEPS_PER_EPOCH // 2
    assert int(to_numpy(model.optimizer.iterations)) == steps
    expected = numpy_average(
        recorder.weights_at(0),
        [recorder.weights_at(step) for step in range(1, steps + 1)],
        decay=0.8,
    )
    state = state_of(averaging)
    assert state["num_updates"] == steps
    assert state["last_step"] == steps
    assert_all_close(state["averages"], expected)


def test_averaging_continues_across_fit_calls():
    model = make_model()
    recorder = WeightRecorder()
    averaging = PolyakAveraging(decay=None)
    fit(model, [recorder, averaging], epochs=1)
    fit(model, [recorder, averaging], epochs=1)
    samples = [recorder.weights_at(step) for step in range(1, 2 * STEPS_PER_EPOCH + 1)]
    expected = numpy_average(None, samples, decay=None)
    assert_all_close(state_of(averaging)["averages"], expected)
    assert averaging.num_updates == 2 * STEPS_PER_EPOCH


def test_update_is_one_compiled_or_multi_tensor_call(monkeypatch):
    # `_plan` decides each check. In a compiled update (tf.function,
    # jax.jit) its Python runs only when the update is traced; on PyTorch it
    # runs at every check, and each update is one multi-tensor lerp.
    plans, lerps = [], []
    plan = PolyakAveraging._plan

    def counting_plan(self, *args):
        plans.append(args)
        return plan(self, *args)

    monkeypatch.setattr(PolyakAveraging, "_plan", counting_plan)
    if keras.backend.backend() == "torch":
        import torch

        lerp = torch._foreach_lerp_

        def counting_lerp(averages, weights, take):
            lerps.append((len(averages), len(weights)))
            return lerp(averages, weights, take)

        monkeypatch.setattr(torch, "_foreach_lerp_", counting_lerp)

    model = make_model()
    averaging = PolyakAveraging()
    fit(model, [averaging], epochs=2)
    steps = 2 * STEPS_PER_EPOCH
    assert averaging.num_updates == steps
    checks = steps + 1  # one before the first step, one after each step
    if keras.backend.backend() == "torch":
        assert len(plans) == checks
        # Every check wrote (the start, then an update per step), each time
        # all averages in one call.
        variables = len(model.trainable_variables)
        assert lerps == [(variables, variables)] * checks
    else:
        assert len(plans) == 1, "the update was traced more than once"


# ---------------------------------------------------------------------------
# Using the averages
# ---------------------------------------------------------------------------


def test_averaged_swaps_in_and_restores_bit_for_bit():
    model = make_model()
    averaging = PolyakAveraging(decay=0.8)
    fit(model, [averaging], epochs=1)
    raw = weights_of(model)
    state = state_of(averaging)
    x, _ = make_data(seed=1)

    for _ in range(2):  # swap in and out twice
        with averaging.averaged() as averaged_model:
            assert averaged_model is model
            assert_bitwise_equal(weights_of(model), state["averages"], "inside")
            # Swapped: the averaging variables hold the raw weights meanwhile.
            assert_states_equal(state_of(averaging), dict(state, averages=raw))
            averaged_predictions = to_numpy(model.predict(x, verbose=0))
            with (
                pytest.raises(ValueError, match="cannot be nested"),
                averaging.averaged(),
            ):
                pass
            with pytest.raises(ValueError, match="inside `averaged\\(\\)`"):
                averaging.apply()
        assert_bitwise_equal(weights_of(model), raw, "raw weights after")
        assert_states_equal(state_of(averaging), state)

    raw_predictions = to_numpy(model.predict(x, verbose=0))
    assert not np.allclose(averaged_predictions, raw_predictions)


def test_weights_saved_inside_averaged_carry_the_true_averages(tmp_path):
    path = str(tmp_path / "inside.weights.h5")
    model = make_model()
    averaging = PolyakAveraging(decay=0.8)
    fit(model, [averaging], epochs=1)
    raw, state = weights_of(model), state_of(averaging)
    with averaging.averaged():
        model.save_weights(path)

    loaded = make_model(seed=99)
    loaded.optimizer.build(loaded.trainable_variables)  # the file has its state
    restored = PolyakAveraging(decay=0.8)
    restored.set_model(loaded)
    loaded.load_weights(path)
    # The file holds the averages as the model's weights, and the averaging
    # state as it was (the averages, not the raw weights).
    assert_bitwise_equal(weights_of(loaded), state["averages"], "weights")
    assert_states_equal(state_of(restored), state)
    assert not np.allclose(raw[0], state["averages"][0])


def test_averaged_restores_weights_after_an_exception():
    model = make_model()
    averaging = PolyakAveraging(decay=0.8)
    fit(model, [averaging], epochs=1)
    raw = weights_of(model)
    with pytest.raises(RuntimeError, match="inside the block"), averaging.averaged():
        raise RuntimeError("inside the block")
    assert_bitwise_equal(weights_of(model), raw, "raw weights")


@pytest.mark.parametrize("how", ["apply()", "at_train_end"])
def test_apply_writes_the_averages(how):
    model = make_model()
    at_train_end = "apply" if how == "at_train_end" else "keep"
    averaging = PolyakAveraging(decay=0.8, at_train_end=at_train_end)
    recorder = WeightRecorder()
    fit(model, [recorder, averaging], epochs=1)
    last_raw = recorder.weights_at(STEPS_PER_EPOCH)
    if how == "apply()":
        assert_bitwise_equal(weights_of(model), last_raw, "keep leaves raw")
        averaging.apply()
    state = state_of(averaging)
    assert_bitwise_equal(weights_of(model), state["averages"], "applied")
    assert not np.allclose(weights_of(model)[0], last_raw[0])


def test_validation_runs_on_averages_and_training_on_raw_weights():
    x, y = make_data()
    x_val, y_val = make_data(seed=3, samples=8)

    runs = {}
    for evaluate_with_average in (True, False):
        model = make_model()
        averaging = PolyakAveraging(
            decay=0.8, evaluate_with_average=evaluate_with_average
        )
        history = fit(model, [averaging], epochs=2, validation_data=(x_val, y_val))
        runs[evaluate_with_average] = (model, averaging, history)

    model, averaging, history = runs[True]
    raw_loss = model.evaluate(x_val, y_val, verbose=0)
    with averaging.averaged():
        averaged_loss = model.evaluate(x_val, y_val, verbose=0)
    # The last validation ran on the averages as they are at the end of fit.
    last_val_loss = history.history["val_loss"][-1]
    np.testing.assert_allclose(last_val_loss, averaged_loss, rtol=1e-6)
    assert not np.isclose(averaged_loss, raw_loss, rtol=1e-3)
    other_model, _, other_history = runs[False]
    other_val_loss = other_history.history["val_loss"][-1]
    np.testing.assert_allclose(other_val_loss, raw_loss, rtol=1e-6)
    # Training went on from the raw weights: both runs trained identically.
    assert_bitwise_equal(weights_of(model), weights_of(other_model), "raw weights")
    # evaluate(callbacks=[averaging]) also uses the averages, then swaps back.
    raw = weights_of(model)
    loss = model.evaluate(x_val, y_val, verbose=0, callbacks=[averaging])
    np.testing.assert_allclose(loss, averaged_loss, rtol=1e-6)
    assert_bitwise_equal(weights_of(model), raw, "raw weights after evaluate")


@requires_tensorflow
def test_export_serves_the_averages(tmp_path):
    import tensorflow as tf

    model = make_model()
    averaging = PolyakAveraging(decay=0.8)
    fit(model, [averaging], epochs=1)
    x, _ = make_data(seed=5, samples=8)
    raw_predictions = to_numpy(model.predict(x, verbose=0))
    path = str(tmp_path / "served")
    with averaging.averaged():
        averaged_predictions = to_numpy(model.predict(x, verbose=0))
        model.export(path, verbose=False)

    served = tf.saved_model.load(path)
    served_predictions = served.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(
        served_predictions, averaged_predictions, rtol=1e-6, atol=1e-6
    )
    assert not np.allclose(served_predictions, raw_predictions, atol=1e-3)
    layer = keras.layers.TFSMLayer(path, call_endpoint="serve")
    np.testing.assert_allclose(
        to_numpy(layer(x)), averaged_predictions, rtol=1e-6, atol=1e-6
    )
    # The SavedModel holds the model's variables, not the averaging state.
    assert len(served.variables) == len(model.variables)


# ---------------------------------------------------------------------------
# Nothing lost on interruption
# ---------------------------------------------------------------------------


class CrashAt(keras.callbacks.Callback):
    """Raises before batch `batch` of epoch `epoch`."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.target = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.target:
            raise RuntimeError("simulated crash")


AVERAGING = dict(decay=0.9, dynamic_decay=True)


@pytest.mark.parametrize(
    "save_freq, averaging_first",
    [("epoch", True), (2, True), (2, False)],
    ids=["epoch-saves", "batch-saves", "batch-saves-backup-listed-first"],
)
def test_backup_and_restore_resumes_the_averages(tmp_path, save_freq, averaging_first):
    x, y = make_data()
    backup_dir = str(tmp_path / "backup")

    def callbacks(averaging, *extra):
        backup = keras.callbacks.BackupAndRestore(backup_dir, save_freq=save_freq)
        ordered = [averaging, backup] if averaging_first else [backup, averaging]
        return ordered + list(extra)

    # A run that crashes in epoch 1 before batch 5 ...
    model = make_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(model, callbacks(PolyakAveraging(**AVERAGING), CrashAt(1, 5)), epochs=3)
    # ... restarts in a "new process": new model, optimizer and callbacks.
    resumed_model = make_model(seed=99)
    resumed = PolyakAveraging(**AVERAGING)
    history = fit(resumed_model, callbacks(resumed), epochs=3)
    # Keras restarts the epoch the last backup was written in.
    assert len(history.history["loss"]) == 2

    # The uninterrupted run doing the same optimizer steps. With saves every
    # epoch, that is a plain fit. With saves every 2 batches, the last
    # backup was after step 10 (epoch 1, batch 3) and Keras's
    # BackupAndRestore restarts epoch 1 from its first batch with the
    # weights of step 10 (for the weights too, not only the averages), so
    # the run is: epoch 0, the first 4 batches of epoch 1, epochs 1 and 2.
    reference_model = make_model()
    reference = PolyakAveraging(**AVERAGING)
    if save_freq == "epoch":
        fit(reference_model, [reference], epochs=3)
        steps = 3 * STEPS_PER_EPOCH
    else:
        fit(reference_model, [reference], epochs=1)
        fit(reference_model, [reference], epochs=1, x=x[:16], y=y[:16])
        fit(reference_model, [reference], epochs=2)
        steps = 4 * STEPS_PER_EPOCH - 2

    assert int(to_numpy(resumed_model.optimizer.iterations)) == steps
    assert_bitwise_equal(
        weights_of(resumed_model), weights_of(reference_model), "weights"
    )
    assert_bitwise_equal(
        optimizer_state_of(resumed_model),
        optimizer_state_of(reference_model),
        "optimizer",
    )
    assert_states_equal(state_of(resumed), state_of(reference))
    assert resumed.num_updates == steps


def test_keras_file_carries_the_averaging_state(tmp_path):
    path = str(tmp_path / "run.keras")
    model = make_model()
    averaging = PolyakAveraging(**AVERAGING)
    weights_before = len(model.weights)
    fit(model, [averaging], epochs=1)
    # Attached state is not part of the model's weights or layers.
    assert len(model.weights) == weights_before
    model.save(path)
    saved_state = state_of(averaging)
    fit(model, [averaging], epochs=1)

    # Later: load the model, attach a new callback, load the same file.
    loaded = keras.saving.load_model(path)
    assert len(loaded.weights) == weights_before
    restored = PolyakAveraging(**AVERAGING)
    restored.set_model(loaded)
    assert not restored.started
    loaded.load_weights(path)
    assert_states_equal(state_of(restored), saved_state)
    fit(loaded, [restored], epochs=1)

    assert_bitwise_equal(weights_of(loaded), weights_of(model), "weights")
    assert_states_equal(state_of(restored), state_of(averaging))


def test_averaging_state_of_other_shapes_is_refused_whole():
    model = make_model()
    averaging = PolyakAveraging(decay=0.8)
    fit(model, [averaging], epochs=1)
    store = {}
    averaging._state.save_own_variables(store)
    before = state_of(averaging)
    count = len(averaging.averages)
    assert count > 1
    store["average_0"] = store["average_0"] + 1.0  # would load first
    store[f"average_{count - 1}"] = np.zeros((7,), "float32")  # refused
    with pytest.raises(ValueError, match="nothing was loaded"):
        averaging._state.load_own_variables(store)
    assert_states_equal(before, state_of(averaging))


def test_weights_without_averaging_state_restart_averaging(tmp_path):
    path = str(tmp_path / "plain.weights.h5")
    plain = make_model()
    fit(plain, [], epochs=1)
    plain.save_weights(path)

    model = make_model()
    averaging = PolyakAveraging()
    fit(model, [averaging], epochs=1)
    assert averaging.started
    model.load_weights(path)
    assert not averaging.started
    assert_bitwise_equal(weights_of(model), weights_of(plain), "weights")


# ---------------------------------------------------------------------------
# tf.distribute
# ---------------------------------------------------------------------------


@requires_tensorflow
def test_mirrored_strategy_mirrors_the_averages():
    import tensorflow as tf

    devices = [f"/cpu:{index}" for index in range(LOGICAL_CPUS)]
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = make_model()
    recorder = WeightRecorder()
    averaging = PolyakAveraging(decay=0.8)
    fit(model, [recorder, averaging], epochs=1)

    expected = numpy_average(
        recorder.weights_at(0),
        [recorder.weights_at(step) for step in range(1, STEPS_PER_EPOCH + 1)],
        decay=0.8,
    )
    assert_all_close(state_of(averaging)["averages"], expected)
    for average in averaging.averages:
        assert isinstance(average.value, tf.distribute.DistributedValues)
        replicas = [
            value.numpy()
            for value in strategy.experimental_local_results(average.value)
        ]
        assert len(replicas) == LOGICAL_CPUS
        for replica in replicas[1:]:
            assert_bitwise_equal([replica], replicas[:1], "replicas")

    raw = weights_of(model)
    with averaging.averaged():
        assert_all_close(weights_of(model), expected)
    for weight, value in zip(model.trainable_variables, raw):
        for replica in strategy.experimental_local_results(weight.value):
            assert_bitwise_equal([replica.numpy()], [value], "replica after swap")


# ---------------------------------------------------------------------------
# Bad input and misuse
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(decay=1.0), "`decay` must be a number in (0, 1), or None"),
        (dict(decay=0.0), "`decay` must be a number in (0, 1), or None"),
        (dict(decay=-0.5), "`decay` must be a number in (0, 1), or None"),
        (dict(decay="high"), "`decay` must be a number in (0, 1), or None"),
        (dict(update_every=0), "`update_every` must be an integer >= 1"),
        (dict(update_every=2.5), "`update_every` must be an integer >= 1"),
        (dict(start_step=-1), "`start_step` must be an integer >= 0"),
        (dict(at_train_end="average"), "`at_train_end` must be one of 'keep', 'apply'"),
        (dict(dynamic_decay="yes"), "`dynamic_decay` must be a bool"),
        (dict(evaluate_with_average=1), "`evaluate_with_average` must be a bool"),
        (dict(decay=None, dynamic_decay=True), "`dynamic_decay=True` needs a number"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError) as error:
        PolyakAveraging(**kwargs)
    message = str(error.value)
    assert fragment in message
    name, value = next(iter(kwargs.items()))
    if name == "decay" and len(kwargs) > 1:
        name, value = "decay", None
    assert f"{name}={value!r}" in message


def test_using_the_averages_before_training_is_a_clear_error():
    averaging = PolyakAveraging()
    uses = (
        lambda: averaging.averaged().__enter__(),
        averaging.apply,
        lambda: averaging.averages,
    )
    for use in uses:
        with pytest.raises(ValueError, match="no averages yet.*model.fit"):
            use()
    assert not averaging.started and averaging.num_updates == 0


def test_before_start_step_evaluation_uses_raw_weights_and_apply_errors():
    x_val, y_val = make_data(seed=3, samples=8)
    model = make_model()
    averaging = PolyakAveraging(start_step=100, at_train_end="apply")
    with pytest.warns(UserWarning, match="averaging never started"):
        history = fit(model, [averaging], epochs=1, validation_data=(x_val, y_val))
    assert not averaging.started
    raw_loss = model.evaluate(x_val, y_val, verbose=0)
    np.testing.assert_allclose(history.history["val_loss"][-1], raw_loss, rtol=1e-6)
    with (
        pytest.raises(ValueError, match="start_step=100.*6 steps"),
        averaging.averaged(),
    ):
        pass
    with pytest.raises(ValueError, match="has not started"):
        averaging.apply()


def test_exported_from_the_package():
    assert keras_soma.PolyakAveraging is PolyakAveraging
    assert "PolyakAveraging" in keras_soma.__all__
    assert issubclass(PolyakAveraging, keras.callbacks.Callback)
