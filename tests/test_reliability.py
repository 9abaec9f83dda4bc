"""Faults survived and exact resume, for every registered optimizer:
a crash mid-epoch and a real `kill -9`, each resumed with
keras.callbacks.BackupAndRestore; `.keras`, `save_weights` and
tf.train.Checkpoint round trips; refused mismatched state; NaN/Inf
handling under LossScaleOptimizer; 100,000-step runs that stay bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zlib

import keras
import numpy as np
import pytest
import training_run
from conftest import requires_tensorflow
from helpers import make_stepper, to_numpy
from registry import REGISTRY

import keras_soma

SPECS = [pytest.param(spec, id=name) for name, spec in REGISTRY.items()]
HERE = os.path.dirname(os.path.abspath(__file__))


def assert_same_state(expected: dict, actual: dict):
    assert sorted(expected) == sorted(actual)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


@pytest.fixture(scope="module")
def uninterrupted():
    """Final weights and optimizer state of an uninterrupted run, by name."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = training_run.final_state(training_run.train(name))
        return cache[name]

    return get


@pytest.mark.parametrize("spec", SPECS)
def test_crash_mid_epoch_then_backup_and_restore_is_exact(
    spec, uninterrupted, tmp_path
):
    backup = str(tmp_path / "backup")
    crash_step = training_run.SAMPLES // training_run.BATCH_SIZE + 3  # mid epoch 2
    model = training_run.build(spec.name)
    with pytest.raises(RuntimeError, match="injected crash"):
        training_run.train(
            spec.name, backup, [training_run.CrashAt(crash_step)], model=model
        )
    assert os.path.exists(backup)
    keras.backend.clear_session()
    resumed = training_run.train(spec.name, backup)
    assert_same_state(uninterrupted(spec.name), training_run.final_state(resumed))


@pytest.mark.parametrize("spec", SPECS)
def test_backup_cut_short_by_a_kill_resumes_from_the_one_before(
    spec, uninterrupted, tmp_path
):
    """A kill while `BackupAndRestore` writes its backup leaves a truncated
    weights file (seen on PyTorch, whose save is slow enough for the kill
    test to land in it). Keras cannot open such a file; with
    `double_checkpoint=True` it restores the backup before, and the run
    still ends equal to an uninterrupted one."""
    backup = str(tmp_path / "backup")
    steps_per_epoch = training_run.SAMPLES // training_run.BATCH_SIZE
    crash_step = 2 * steps_per_epoch + 3  # mid epoch 3: two backups written
    with pytest.raises(RuntimeError, match="injected crash"):
        training_run.train(spec.name, backup, [training_run.CrashAt(crash_step)])
    latest = os.path.join(backup, "latest.weights.h5")
    assert os.path.exists(latest + ".bkp")
    with open(latest, "r+b") as weights:
        weights.truncate(os.path.getsize(latest) // 2)
    keras.backend.clear_session()
    recorder = training_run.PrintSteps()
    resumed = training_run.train(spec.name, backup, [recorder])
    # Resumed from the first backup (epochs 2 and 3 again), not the start.
    assert recorder.seen == 2 * steps_per_epoch
    assert_same_state(uninterrupted(spec.name), training_run.final_state(resumed))


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_kill_9_at_a_random_step_then_resume_is_exact(spec, uninterrupted, tmp_path):
    # crc32, not hash(): str hashes change from process to process.
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
    steps_per_epoch = training_run.SAMPLES // training_run.BATCH_SIZE
    total_steps = steps_per_epoch * training_run.EPOCHS
    kill_step = int(rng.integers(steps_per_epoch + 1, total_steps))  # after a backup
    backup = str(tmp_path / "backup")
    output = str(tmp_path / "final.npz")
    command = [
        sys.executable,
        os.path.join(HERE, "training_run.py"),
        spec.name,
        backup,
        output,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    killed_after = None
    try:
        for line in process.stdout:
            if line.startswith("step ") and int(line.split()[1]) >= kill_step:
                process.send_signal(signal.SIGKILL)
                killed_after = int(line.split()[1])
                break
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert killed_after is not None, "the run ended before it could be killed"
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(output)

    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    steps_rerun = finished.stdout.count("step ")
    assert steps_rerun < total_steps, "the restart did not resume from the backup"
    with np.load(output) as saved:
        assert_same_state(uninterrupted(spec.name), dict(saved))


def continue_training(model, epochs=1):
    inputs, targets = training_run.data()
    model.fit(inputs, targets, epochs=epochs, batch_size=16, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("spec", SPECS)
def test_save_weights_round_trip_includes_optimizer_state(spec, tmp_path):
    reference = continue_training(training_run.build(spec.name), epochs=2)

    first = continue_training(training_run.build(spec.name), epochs=1)
    path = str(tmp_path / "run.weights.h5")
    first.save_weights(path)
    second = training_run.build(spec.name)
    second.optimizer.build(second.trainable_variables)
    second.load_weights(path)
    continue_training(second, epochs=1)
    assert_same_state(
        training_run.final_state(reference), training_run.final_state(second)
    )


@requires_tensorflow
@pytest.mark.parametrize("spec", SPECS)
def test_tf_train_checkpoint_round_trip(spec, tmp_path):
    import tensorflow as tf

    reference = continue_training(training_run.build(spec.name), epochs=2)
    first = continue_training(training_run.build(spec.name), epochs=1)
    prefix = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(
        str(tmp_path / "ckpt")
    )
    second = training_run.build(spec.name)
    second.optimizer.build(second.trainable_variables)
    status = tf.train.Checkpoint(model=second, optimizer=second.optimizer).restore(
        prefix
    )
    status.assert_existing_objects_matched()
    continue_training(second, epochs=1)
    assert_same_state(
        training_run.final_state(reference), training_run.final_state(second)
    )


def optimizer_state_values(optimizer):
    return [to_numpy(v).copy() for v in optimizer.variables]


@pytest.mark.parametrize("spec", SPECS)
def test_model_saved_before_training_loads_and_trains_as_the_original(spec, tmp_path):
    # An optimizer saved before it is built saves its step counter and
    # learning rate only; `load_model` builds it first and must load them.
    model = training_run.build(spec.name)
    path = str(tmp_path / "untrained.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert int(to_numpy(loaded.optimizer.iterations)) == 0
    continue_training(model, epochs=1)
    continue_training(loaded, epochs=1)
    assert_same_state(training_run.final_state(model), training_run.final_state(loaded))


def store_of(optimizer):
    return {str(i): to_numpy(v) for i, v in enumerate(optimizer.variables)}


def assert_refused_whole(optimizer, store):
    before = optimizer_state_values(optimizer)
    with pytest.raises(ValueError, match="Cannot load optimizer state"):
        optimizer.load_own_variables(store)
    for expected, actual in zip(before, optimizer_state_values(optimizer)):
        np.testing.assert_array_equal(actual, expected)


def test_unbuilt_state_is_refused_by_an_optimizer_that_has_stepped():
    trained = continue_training(training_run.build("Soma"), epochs=1)
    assert_refused_whole(trained.optimizer, store_of(keras_soma.Soma()))


def test_trained_state_of_an_unbuilt_size_is_refused():
    # Keras SGD without momentum keeps a step counter and a learning rate,
    # as an unbuilt optimizer does; after training its store is refused.
    sgd = training_run.build("Soma")
    sgd.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    store = store_of(continue_training(sgd, epochs=1).optimizer)
    assert len(store) == 2 and int(store["0"]) > 0
    target = training_run.build("Soma")
    target.optimizer.build(target.trainable_variables)
    assert_refused_whole(target.optimizer, store)


def test_step_counter_of_another_integer_width_loads():
    # TensorFlow keeps the step counter in int64, JAX and torch in int32:
    # a model saved on one backend loads on another.
    source = continue_training(training_run.build("Soma"), epochs=1)
    store = store_of(source.optimizer)
    saved = store["0"]
    assert saved.dtype.kind == "i" and saved.shape == ()
    store["0"] = saved.astype(np.int32 if saved.dtype == np.int64 else np.int64)
    target = training_run.build("Soma")
    target.optimizer.build(target.trainable_variables)
    target.optimizer.load_own_variables(store)
    assert int(to_numpy(target.optimizer.iterations)) == int(saved) > 0
    for expected, actual in zip(
        optimizer_state_values(source.optimizer),
        optimizer_state_values(target.optimizer),
    ):
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("spec", SPECS)
def test_state_from_another_optimizer_is_refused_whole(spec, tmp_path):
    source = continue_training(training_run.build(spec.name), epochs=1)
    # Keras's Adam keeps two slots per variable: a different count.
    other = training_run.build(spec.name)
    other.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    continue_training(other, epochs=1)
    path = str(tmp_path / "adam.weights.h5")
    other.save_weights(path)
    before = optimizer_state_values(source.optimizer)
    with pytest.raises(ValueError, match="Cannot load optimizer state"):
        source.load_weights(path)
    for expected, actual in zip(before, optimizer_state_values(source.optimizer)):
        np.testing.assert_array_equal(actual, expected)


def test_state_of_same_count_but_other_dtype_is_refused():
    """Soma (float32 momentum) and GradSign (int8 counter) have the same
    number of variables of the same shapes: the dtype tells them apart."""
    soma = continue_training(training_run.build("Soma"), epochs=1)
    gradsign = continue_training(training_run.build("GradSign"), epochs=1)
    store = {str(i): to_numpy(v) for i, v in enumerate(gradsign.optimizer.variables)}
    before = optimizer_state_values(soma.optimizer)
    with pytest.raises(
        ValueError, match="different optimizer or for\\s+different shapes"
    ):
        soma.optimizer.load_own_variables(store)
    for expected, actual in zip(before, optimizer_state_values(soma.optimizer)):
        np.testing.assert_array_equal(actual, expected)


def test_state_for_other_shapes_is_refused():
    optimizer = keras_soma.Soma()
    variable = keras.Variable(np.zeros((3, 4), "float32"))
    optimizer.build([variable])
    store = {str(i): to_numpy(v) for i, v in enumerate(optimizer.variables)}
    store[str(len(store) - 1)] = np.zeros((4, 3), "float32")
    with pytest.raises(ValueError, match="shape"):
        optimizer.load_own_variables(store)


# ---------------------------------------------------------------------------
# Non-finite gradients under LossScaleOptimizer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_loss_scale_optimizer_skip_leaves_our_state_untouched(spec):
    variable = keras.Variable(np.ones((3, 2), "float32"))
    optimizer = keras.optimizers.LossScaleOptimizer(spec.cls(learning_rate=0.1))
    optimizer.build([variable])
    # Compiled: Keras's JAX LossScaleOptimizer runs statelessly.
    step = make_stepper(optimizer, [variable], "compiled")
    finite = np.full((3, 2), 0.5, "float32") * float(to_numpy(optimizer.dynamic_scale))
    step([finite])
    inner = optimizer.inner_optimizer
    before = optimizer_state_values(inner)
    weights_before = to_numpy(variable).copy()
    assert not np.array_equal(weights_before, np.ones((3, 2))), "first step did nothing"
    overflow = finite.copy()
    overflow[0, 0] = np.inf
    step([overflow])
    np.testing.assert_array_equal(to_numpy(variable), weights_before)
    for expected, actual in zip(before, optimizer_state_values(inner)):
        np.testing.assert_array_equal(actual, expected)


# ---------------------------------------------------------------------------
# Long runs
# ---------------------------------------------------------------------------

LONG_STEPS = 100_000


def run_many_steps(optimizer, variable, steps, seed=0):
    """`steps` updates with uniform(-1, 1) gradients inside one compiled
    loop (on PyTorch, which compiles no loops, a loop over one compiled
    step); returns nothing (the variables hold the result)."""
    backend = keras.backend.backend()
    optimizer.build([variable])
    shape = tuple(variable.shape)
    if backend == "torch":
        import torch

        step = make_stepper(optimizer, [variable], "compiled")
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            step([torch.rand(shape, generator=generator) * 2.0 - 1.0])
        assert step.trace_count() == 1
        return
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(autograph=False)
        def loop():
            def body(step):
                gradient = tf.random.stateless_uniform(
                    shape, seed=tf.stack([seed, step]), minval=-1.0, maxval=1.0
                )
                optimizer.apply([gradient], [variable])
                return (step + 1,)

            tf.while_loop(lambda step: step < steps, body, (tf.constant(0),))

        loop()
        return
    import jax

    def body(step, carry):
        optimizer_values, variable_values = carry
        gradient = jax.random.uniform(
            jax.random.fold_in(jax.random.PRNGKey(seed), step),
            shape,
            minval=-1.0,
            maxval=1.0,
        )
        new_variables, new_optimizer = optimizer.stateless_apply(
            optimizer_values, [gradient], variable_values
        )
        return new_optimizer, new_variables

    optimizer_values, variable_values = jax.jit(
        lambda carry: jax.lax.fori_loop(0, steps, body, carry)
    )(([v.value for v in optimizer.variables], [variable.value]))
    for target, value in zip(optimizer.variables, optimizer_values):
        target.assign(value)
    variable.assign(variable_values[0])


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_hundred_thousand_steps_stay_bounded(spec):
    variable = keras.Variable(np.zeros((4, 3), "float32"))
    learning_rate = 1e-4
    optimizer = spec.cls(learning_rate=learning_rate)
    run_many_steps(optimizer, variable, LONG_STEPS)
    assert int(to_numpy(optimizer.iterations)) == LONG_STEPS
    values = to_numpy(variable)
    assert np.isfinite(values).all()
    # No optimizer here moves a parameter by more than about
    # learning_rate per step (SM3's normalized step can exceed it only
    # while its accumulators are small).
    assert np.abs(values).max() <= 10 * learning_rate * LONG_STEPS
    for name, slot in optimizer.get_slots(variable).items():
        state = to_numpy(slot).astype("float64")
        assert np.isfinite(state).all(), name
        if name == "momentum":  # a convex combination of |g| <= 1
            assert np.abs(state).max() <= 1.0 + 1e-6, name
        if name == "sign_counter":
            assert state.min() >= -61 and state.max() <= 60
        if name.startswith("accumulator"):  # sums of g^2 <= 1 per step
            assert state.max() <= LONG_STEPS + 1, name
