"""The contract every exported keras_soma optimizer owes, one table for all.

Parameterized over `registry.REGISTRY`; adding an optimizer means adding a
row there, and `test_registry_lists_every_export` fails until it is added.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
from conftest import requires_tensorflow, requires_torch
from helpers import (
    TOLERANCE,
    assert_refused_changing_nothing,
    compiled_step_memory,
    make_row_stepper,
    make_stepper,
    native_elementwise_gradient,
    op_determinism,
    random_gradient,
    sparse_modes,
    to_numpy,
)
from registry import CONTRACT_ROWS, REGISTRY, exported_optimizers

import keras_soma
from keras_soma.memory import state_bytes_per_parameter

SPECS = [pytest.param(spec, id=name) for name, spec in CONTRACT_ROWS.items()]
# One row per class, for what is a property of the class (its registered
# name, its defaults).
CLASS_SPECS = [pytest.param(spec, id=name) for name, spec in REGISTRY.items()]


def test_registry_lists_every_export():
    exported = {cls.__name__ for cls in exported_optimizers()}
    assert exported, "keras_soma exports no optimizer"
    missing = exported - set(REGISTRY)
    assert not missing, f"exported but not in tests/registry.py: {sorted(missing)}"
    assert set(REGISTRY) <= exported, "registry lists a class that is not exported"


# ---------------------------------------------------------------------------
# Construction and configuration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_bad_arguments_raise_value_error_naming_argument(spec):
    for kwargs, argument in spec.bad_arguments:
        with pytest.raises(ValueError) as raised:
            spec.make(**kwargs)
        message = str(raised.value)
        assert f"`{argument}`" in message, (kwargs, message)
        assert "received" in message, (kwargs, message)
        received = kwargs[argument]
        assert repr(received) in message or str(received) in message, (
            kwargs,
            message,
        )


@pytest.mark.parametrize(
    "learning_rate", [1, np.float32(0.25), np.float64(0.25)], ids=repr
)
@pytest.mark.parametrize("spec", SPECS)
def test_learning_rate_of_any_numeric_type_is_a_float(spec, learning_rate):
    # Keras itself refuses a learning rate that is not a Python float.
    optimizer = spec.make(learning_rate=learning_rate)
    assert optimizer.get_config()["learning_rate"] == float(learning_rate)


@pytest.mark.parametrize("spec", SPECS)
def test_learning_rate_variable_is_refused_with_what_to_do(spec):
    variables = [keras.Variable(0.1)]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        variables.append(tf.Variable(0.1))  # A Keras 2 habit.
    for variable in variables:
        with pytest.raises(ValueError, match=r"assign\s+`optimizer.learning_rate`"):
            spec.make(learning_rate=variable)


@pytest.mark.parametrize("spec", SPECS)
def test_numpy_integer_arguments_become_ints(spec):
    optimizer = spec.make(gradient_accumulation_steps=np.int64(2))
    assert type(optimizer.gradient_accumulation_steps) is int
    assert type(optimizer.get_config()["gradient_accumulation_steps"]) is int


@pytest.mark.parametrize("spec", SPECS)
def test_weight_decay_variable_is_read_at_every_step(spec):
    # A scheduled weight decay: Keras reads the variable at every step.
    decay = keras.Variable(0.0)
    variable = keras.Variable(np.ones((2, 3), "float32"))
    optimizer = spec.make(learning_rate=0.1, weight_decay=decay)
    optimizer.build([variable])
    decay.assign(0.5)
    optimizer.apply([np.zeros((2, 3), "float32")], [variable])
    np.testing.assert_allclose(to_numpy(variable), np.full((2, 3), 0.95), rtol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
def test_config_round_trip(spec):
    optimizer = spec.make(**spec.config_case)
    config = optimizer.get_config()
    for key, value in spec.config_case.items():
        assert config[key] == pytest.approx(value), key
    restored = spec.cls.from_config(config)
    assert restored.get_config() == config
    # JSON round trip through Keras's own serialization.
    serialized = json.loads(json.dumps(keras.optimizers.serialize(optimizer)))
    deserialized = keras.optimizers.deserialize(serialized)
    assert type(deserialized) is spec.cls
    assert deserialized.get_config() == config


@pytest.mark.parametrize("spec", CLASS_SPECS)
def test_get_by_registered_name(spec):
    registered = keras.saving.get_registered_name(spec.cls)
    assert registered == f"keras_soma>{spec.name}"
    optimizer = keras.optimizers.get(registered)
    assert type(optimizer) is spec.cls
    assert optimizer.get_config() == spec.cls().get_config()


@pytest.mark.parametrize("spec", SPECS)
def test_schedule_config_round_trip(spec):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.5)
    optimizer = spec.make(learning_rate=schedule)
    config = json.loads(json.dumps(keras.optimizers.serialize(optimizer)))
    restored = keras.optimizers.deserialize(config)
    assert restored.get_config() == optimizer.get_config()
    assert restored.get_config()["learning_rate"]["config"] == schedule.get_config()


# ---------------------------------------------------------------------------
# Training with fit
# ---------------------------------------------------------------------------


def regression_problem(seed=0, samples=256, features=8):
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((samples, features)).astype("float32")
    true_weights = rng.standard_normal((features, 1)).astype("float32")
    targets = inputs @ true_weights + 0.1
    return inputs, targets.astype("float32")


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="output"),
        ]
    )


def compiled_model(optimizer, jit_compile="auto", seed=0):
    model = small_model(seed)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    return model


def weights_of(model):
    return [to_numpy(weight) for weight in model.weights]


def optimizer_values(optimizer):
    return [to_numpy(variable) for variable in optimizer.variables]


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("spec", SPECS)
def test_fit_lowers_loss(spec, jit_compile):
    inputs, targets = regression_problem()
    model = compiled_model(spec.make(learning_rate=spec.fit_learning_rate), jit_compile)
    initial = model.evaluate(inputs, targets, verbose=0)
    history = model.fit(inputs, targets, epochs=8, batch_size=32, verbose=0)
    final = model.evaluate(inputs, targets, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert final < 0.5 * initial, (initial, final)


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_continue_equals_uninterrupted(spec, tmp_path):
    inputs, targets = regression_problem()
    fit_kwargs = dict(batch_size=32, shuffle=False, verbose=0)

    uninterrupted = compiled_model(spec.make(learning_rate=spec.fit_learning_rate))
    uninterrupted.fit(inputs, targets, epochs=4, **fit_kwargs)

    interrupted = compiled_model(spec.make(learning_rate=spec.fit_learning_rate))
    interrupted.fit(inputs, targets, epochs=2, **fit_kwargs)
    path = os.path.join(tmp_path, "model.keras")
    interrupted.save(path)
    del interrupted
    keras.backend.clear_session()
    restored = keras.saving.load_model(path)  # no custom_objects needed
    assert type(restored.optimizer) is spec.cls
    restored.fit(inputs, targets, epochs=2, **fit_kwargs)

    for expected, actual in zip(weights_of(uninterrupted), weights_of(restored)):
        np.testing.assert_array_equal(actual, expected)
    expected_state = optimizer_values(uninterrupted.optimizer)
    actual_state = optimizer_values(restored.optimizer)
    assert len(expected_state) == len(actual_state)
    for expected, actual in zip(expected_state, actual_state):
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("spec", SPECS)
def test_learning_rate_schedule_is_followed(spec):
    schedule = keras.optimizers.schedules.ExponentialDecay(
        spec.fit_learning_rate, decay_steps=4, decay_rate=0.5
    )
    optimizer = spec.make(learning_rate=schedule)
    inputs, targets = regression_problem()
    model = compiled_model(optimizer)
    model.fit(inputs, targets, epochs=1, batch_size=32, verbose=0)
    steps = int(to_numpy(optimizer.iterations))
    assert steps == 8
    np.testing.assert_allclose(
        float(to_numpy(optimizer.learning_rate)),
        float(to_numpy(schedule(steps))),
        rtol=1e-6,
    )


def two_steps(spec, gradients, variable_value, **kwargs):
    variable = keras.Variable(variable_value, name="weights")
    optimizer = spec.make(learning_rate=0.01, **kwargs)
    optimizer.build([variable])
    step = make_stepper(optimizer, [variable], "eager")
    for gradient in gradients:
        step([gradient])
    return variable, optimizer


@pytest.mark.parametrize("spec", SPECS)
def test_gradient_accumulation_equals_mean_gradient(spec):
    rng = np.random.default_rng(3)
    start = rng.standard_normal((5, 4)).astype("float32")
    first, second = (random_gradient(rng, (5, 4)) for _ in range(2))

    accumulated, accumulating = two_steps(
        spec, [first, second], start, gradient_accumulation_steps=2
    )
    direct, direct_optimizer = two_steps(spec, [(first + second) / 2], start)
    assert not np.array_equal(to_numpy(accumulated), start), "no update happened"
    np.testing.assert_allclose(to_numpy(accumulated), to_numpy(direct), rtol=1e-6)
    # Soma's blockwise int8 average is requantized after every micro-step,
    # so it carries each micro-step's rounding: on other data it can be
    # several codes away from the average of the mean gradient; on this
    # data, after a window of 2, one code at most.
    quantized = spec.arguments.get("momentum_dtype") == "int8"
    tolerances = {"momentum": (0, 1), "momentum_scale": (1 / 127, 0)}
    for name, slot in direct_optimizer.get_slots(direct).items():
        rtol, atol = tolerances.get(name, (1e-6, 1e-7)) if quantized else (1e-6, 1e-7)
        np.testing.assert_allclose(
            to_numpy(accumulating.get_slots(accumulated)[name]),
            to_numpy(slot),
            rtol=rtol,
            atol=atol,
        )


@pytest.mark.parametrize("skip_nonfinite", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_apply_without_variables_before_build_is_refused_and_builds_nothing(
    spec, skip_nonfinite
):
    optimizer = spec.make(skip_nonfinite=skip_nonfinite)
    gradient = np.ones((2, 3), "float32")
    with pytest.raises(ValueError, match="must already be built"):
        optimizer.apply([gradient])
    assert not optimizer.built
    # The call the error asks for then works.
    variable = keras.Variable(np.zeros((2, 3), "float32"))
    optimizer.apply([gradient], [variable])
    assert not np.array_equal(to_numpy(variable), np.zeros((2, 3)))


@pytest.mark.parametrize("spec", SPECS)
def test_skip_nonfinite_with_accumulation_counts_micro_step_as_zero(spec):
    """With `gradient_accumulation_steps`, skipping a whole window would
    take a copy of the state from before it: a non-finite micro-step is
    counted and its gradients count as zeros instead, so a NaN never
    reaches the accumulator (GradSign, SM3, Soma with clipping) or the
    folded average (Soma)."""
    rng = np.random.default_rng(4)
    start = rng.standard_normal((5, 4)).astype("float32")
    gradients = [random_gradient(rng, (5, 4)) for _ in range(4)]
    with_nan, with_inf = gradients[1].copy(), gradients[2].copy()
    with_nan[0, 0], with_inf[1, 1] = np.nan, np.inf
    zeros = np.zeros((5, 4), "float32")
    for extra in ({}, {"clipnorm": 1.0}):
        skipping, optimizer = two_steps(
            spec,
            [gradients[0], with_nan, with_inf, gradients[3]],
            start,
            gradient_accumulation_steps=2,
            skip_nonfinite=True,
            **extra,
        )
        expected, expected_optimizer = two_steps(
            spec,
            [gradients[0], zeros, zeros, gradients[3]],
            start,
            gradient_accumulation_steps=2,
            **extra,
        )
        assert int(to_numpy(optimizer.skipped_steps)) == 2, extra
        assert np.isfinite(to_numpy(skipping)).all(), extra
        assert not np.array_equal(to_numpy(skipping), start), extra
        np.testing.assert_allclose(
            to_numpy(skipping), to_numpy(expected), rtol=1e-6, err_msg=str(extra)
        )
        for name, slot in expected_optimizer.get_slots(expected).items():
            np.testing.assert_allclose(
                to_numpy(optimizer.get_slots(skipping)[name]),
                to_numpy(slot),
                rtol=1e-6,
                atol=1e-7,
                err_msg=f"{name} {extra}",
            )


@pytest.mark.parametrize("spec", SPECS)
def test_exclude_from_weight_decay(spec):
    keras.utils.set_random_seed(0)
    layer = keras.layers.Dense(3, bias_initializer="ones", name="dense")
    layer.build((None, 4))
    optimizer = spec.make(learning_rate=0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    kernel_before = to_numpy(layer.kernel)
    zeros = [np.zeros(layer.kernel.shape, "float32"), np.zeros((3,), "float32")]
    optimizer.apply(zeros, [layer.kernel, layer.bias])
    # A zero gradient moves nothing on its own (sign(0) = 0 / no update),
    # so the only change is decay: theta * (1 - lr * wd) on the kernel.
    np.testing.assert_allclose(
        to_numpy(layer.kernel), kernel_before * (1 - 0.1 * 0.5), rtol=1e-6
    )
    np.testing.assert_array_equal(to_numpy(layer.bias), np.ones(3, "float32"))


@pytest.mark.parametrize("spec", SPECS)
def test_clipping_options_are_applied(spec):
    rng = np.random.default_rng(5)
    start = rng.standard_normal((4, 4)).astype("float32")
    gradient = random_gradient(rng, (4, 4), scale=10.0)
    for kwargs in ({"clipvalue": 0.5}, {"clipnorm": 1.0}, {"global_clipnorm": 1.0}):
        clipped, _ = two_steps(spec, [gradient], start, **kwargs)
        if "clipvalue" in kwargs:
            manual = np.clip(gradient, -0.5, 0.5)
        else:
            manual = gradient * (1.0 / np.linalg.norm(gradient))
        expected, _ = two_steps(spec, [manual.astype("float32")], start)
        np.testing.assert_allclose(
            to_numpy(clipped), to_numpy(expected), rtol=1e-5, err_msg=str(kwargs)
        )


@pytest.mark.parametrize("spec", SPECS)
def test_use_ema_keeps_average_and_loss_scale_factor(spec):
    inputs, targets = regression_problem()
    optimizer = spec.make(
        learning_rate=spec.fit_learning_rate, use_ema=True, ema_momentum=0.9
    )
    model = compiled_model(optimizer)
    model.fit(inputs, targets, epochs=1, batch_size=32, verbose=0)
    plain = spec.make(learning_rate=spec.fit_learning_rate)
    plain.build(model.trainable_variables)
    # One more copy of the weights: the moving average.
    assert len(optimizer.variables) == len(plain.variables) + len(
        model.trainable_variables
    )
    # fit() ends by writing the averages into the model (Keras's
    # finalize_variable_values), so its weights differ from a run without
    # EMA and are finite.
    without_ema = compiled_model(spec.make(learning_rate=spec.fit_learning_rate))
    without_ema.fit(inputs, targets, epochs=1, batch_size=32, verbose=0)
    averaged = weights_of(model)
    assert any(
        not np.array_equal(a, b) for a, b in zip(weights_of(without_ema), averaged)
    )
    assert all(np.isfinite(a).all() for a in averaged)
    # loss_scale_factor scales the loss and unscales the gradients: the
    # same update as without it.
    rng = np.random.default_rng(9)
    start = rng.standard_normal((3, 3)).astype("float32")
    gradient = random_gradient(rng, (3, 3))
    scaled, _ = two_steps(spec, [gradient * 128.0], start, loss_scale_factor=128.0)
    plain, _ = two_steps(spec, [gradient], start)
    np.testing.assert_allclose(to_numpy(scaled), to_numpy(plain), rtol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
def test_mixed_float16_under_loss_scale_optimizer(spec):
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    inputs, targets = regression_problem()
    model = small_model()
    model.compile(optimizer=spec.make(learning_rate=spec.fit_learning_rate), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    initial = model.evaluate(inputs, targets, verbose=0)
    model.fit(inputs, targets, epochs=8, batch_size=32, verbose=0)
    final = model.evaluate(inputs, targets, verbose=0)
    assert np.isfinite(final) and final < 0.5 * initial, (initial, final)
    for weight in model.trainable_variables:
        assert keras.backend.standardize_dtype(weight.dtype) == "float32"
    inner = model.optimizer.inner_optimizer
    assert type(inner) is spec.cls
    for weight in model.trainable_variables:
        for slot in inner.get_slots(weight).values():
            assert np.isfinite(to_numpy(slot).astype("float64")).all()


@pytest.mark.parametrize("spec", SPECS)
def test_compiled_step_traces_once_and_keeps_dtypes(spec):
    variable = keras.Variable(np.ones((4, 3), "float32"))
    optimizer = spec.make(learning_rate=0.01)
    optimizer.build([variable])
    dtypes_before = [v.dtype for v in optimizer.variables]
    shapes_before = [tuple(v.shape) for v in optimizer.variables]
    step = make_stepper(optimizer, [variable], "compiled")
    rng = np.random.default_rng(0)
    for _ in range(3):
        step([random_gradient(rng, (4, 3))])
    assert step.trace_count() == 1
    assert [v.dtype for v in optimizer.variables] == dtypes_before
    assert [tuple(v.shape) for v in optimizer.variables] == shapes_before
    assert keras.backend.standardize_dtype(variable.dtype) == "float32"


# ---------------------------------------------------------------------------
# Sparse gradients
# ---------------------------------------------------------------------------


def sparse_argument_sets(spec):
    """Constructor arguments to apply sparse gradients under: the defaults,
    and those that select the row path where it is a choice."""
    return [{}, spec.sparse_arguments] if spec.sparse_arguments else [{}]


def rows_with_a_repeat(rng, shape, count=5):
    """Row indices, one of them named twice (repeats are summed), and
    their gradients."""
    indices = rng.choice(np.arange(shape[0]), size=count)
    indices[1] = indices[0]
    values = rng.standard_normal((count, *shape[1:])).astype("float32")
    return indices.astype("int64"), values


def slot_values(optimizer, variable):
    return {
        name: to_numpy(value) for name, value in optimizer.get_slots(variable).items()
    }


def assert_same_results(
    variable, optimizer, expected_variable, expected_state, context
):
    tolerance = TOLERANCE["float32"]
    np.testing.assert_allclose(
        to_numpy(variable),
        expected_variable,
        rtol=tolerance,
        atol=tolerance,
        err_msg=f"variable {context}",
    )
    state = slot_values(optimizer, variable)
    assert sorted(state) == sorted(expected_state), context
    for name, expected in expected_state.items():
        assert state[name].dtype == expected.dtype, (name, context)
        tolerance = TOLERANCE.get(str(expected.dtype), 0)
        np.testing.assert_allclose(
            state[name].astype(np.float64),
            expected.astype(np.float64),
            rtol=tolerance,
            atol=tolerance,
            err_msg=f"slot {name!r} {context}",
        )


@pytest.mark.parametrize("mode", sparse_modes())
@pytest.mark.parametrize("spec", SPECS)
def test_row_sparse_gradients_equal_dense_or_the_row_reference(spec, mode):
    """Keras's sparse-gradient contract (its
    keras/src/optimizers/optimizer_sparse_test.py): the backend's sparse
    gradient of some rows (tf.IndexedSlices, a BCOO, a torch sparse COO
    tensor; `helpers.native_row_gradient`), a row named twice included, is
    accepted and gives the results of the dense gradient it stands for;
    where the optimizer takes its row path instead, those of the numpy row
    reference."""
    shape = (8, 3)
    learning_rate = 0.05
    for arguments in sparse_argument_sets(spec):
        rng = np.random.default_rng(11)
        start = rng.standard_normal(shape).astype("float32")
        variables, optimizers = [], []
        for _ in range(2):
            variables.append(keras.Variable(start))
            optimizers.append(spec.make(learning_rate=learning_rate, **arguments))
            optimizers[-1].build([variables[-1]])
        (sparse_variable, dense_variable), (sparse_optimizer, dense_optimizer) = (
            variables,
            optimizers,
        )
        sparse_step = make_row_stepper(sparse_optimizer, sparse_variable, mode)
        dense_step = make_stepper(dense_optimizer, [dense_variable], mode)
        row_path = spec.takes_row_path(arguments)
        expected_variable = start
        expected_state = slot_values(sparse_optimizer, sparse_variable)
        for step in range(3):
            indices, values = rows_with_a_repeat(rng, shape)
            sparse_step(indices, values)
            if row_path:
                expected_variable, expected_state = spec.sparse_reference_step(
                    expected_variable,
                    indices,
                    values,
                    expected_state,
                    learning_rate,
                    **spec.arguments,
                )
            else:
                dense = np.zeros(shape, "float32")
                np.add.at(dense, indices, values)
                dense_step([dense])
                expected_variable = to_numpy(dense_variable)
                expected_state = slot_values(dense_optimizer, dense_variable)
            context = f"{arguments}, row path: {row_path}, step {step}"
            assert_same_results(
                sparse_variable,
                sparse_optimizer,
                expected_variable,
                expected_state,
                context,
            )
        assert not np.array_equal(to_numpy(sparse_variable), start), arguments


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="TensorFlow hands an optimizer no element-wise sparse gradient: "
    "its sparse gradient, tf.IndexedSlices, always names whole rows",
)
@pytest.mark.parametrize("mode", sparse_modes())
@pytest.mark.parametrize("spec", SPECS)
def test_elementwise_sparse_gradients_equal_dense(spec, mode):
    """A sparse gradient over every axis (a BCOO with `n_sparse` = rank, a
    torch sparse COO tensor with `sparse_dim` = rank) names no whole rows:
    every optimizer, with every choice, applies the dense gradient."""
    shape = (6, 4)
    for arguments in sparse_argument_sets(spec):
        rng = np.random.default_rng(12)
        start = rng.standard_normal(shape).astype("float32")
        variables, optimizers = [], []
        for _ in range(2):
            variables.append(keras.Variable(start))
            optimizers.append(spec.make(learning_rate=0.05, **arguments))
            optimizers[-1].build([variables[-1]])
        steps = [
            make_stepper(optimizer, [variable], mode)
            for optimizer, variable in zip(optimizers, variables)
        ]
        for step in range(3):
            dense = random_gradient(rng, shape, zero_fraction=0.5)
            steps[0]([native_elementwise_gradient(dense)])
            steps[1]([dense])
            assert_same_results(
                variables[0],
                optimizers[0],
                to_numpy(variables[1]),
                slot_values(optimizers[1], variables[1]),
                f"{arguments}, step {step}",
            )
        assert not np.array_equal(to_numpy(variables[0]), start), arguments


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


def fashion_mnist_mlp():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def measured_bytes_per_parameter(optimizer):
    model = fashion_mnist_mlp()
    optimizer.build(model.trainable_variables)
    return state_bytes_per_parameter(optimizer, model.trainable_variables)


@pytest.mark.parametrize("spec", SPECS)
def test_state_bytes_per_parameter(spec):
    for kwargs, expected in spec.bytes_per_parameter:
        measured = measured_bytes_per_parameter(spec.make(**kwargs))
        assert measured == pytest.approx(expected, abs=0.005), kwargs


def test_keras_adam_is_the_eight_byte_yardstick():
    assert measured_bytes_per_parameter(keras.optimizers.Adam()) == 8.0
    assert measured_bytes_per_parameter(
        keras_soma.Soma()
    ) == 0.5 * measured_bytes_per_parameter(keras.optimizers.Adam())


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="XLA's memory analysis, read through JAX"
)
@pytest.mark.parametrize("spec", SPECS)
def test_compiled_step_needs_at_most_one_variable_sized_temporary(spec):
    """The performance issue's memory bound: besides the variables, the
    gradients and the state (all updated in place), a compiled step may
    allocate at most one temporary the size of the largest variable."""
    shapes = [(1024, 512), (512,), (512, 256), (256,)]
    variables = [keras.Variable(np.ones(shape, "float32")) for shape in shapes]
    gradients = [keras.ops.ones(shape) for shape in shapes]
    largest = max(int(np.prod(shape)) * 4 for shape in shapes)
    for kwargs, _ in spec.bytes_per_parameter:
        optimizer = spec.make(**kwargs)
        optimizer.build(variables)
        analysis = compiled_step_memory(optimizer, variables, gradients)
        assert analysis.temp_size_in_bytes <= spec.temporary_allowance * largest, (
            kwargs,
            analysis.temp_size_in_bytes,
            largest,
        )
        # Every variable and state tensor is updated in place: what is not
        # aliased to an argument is scalars and the results' tuple tables.
        assert analysis.output_size_in_bytes - analysis.alias_size_in_bytes < 1024, (
            kwargs
        )


# ---------------------------------------------------------------------------
# fused=True: the fused path (the XLA kernel on TensorFlow, multi-tensor
# torch ops on PyTorch), or a ValueError saying where it exists
# ---------------------------------------------------------------------------


def fused_refusal(reason):
    """The start of the message refusing `fused=True`, with its reason."""
    return (
        r"`fused` can be True only where a fused update exists: on the "
        r"TensorFlow backend, inside a tf.function.*on the PyTorch backend.*"
        rf"Here {reason}; received: fused=True"
    )


def refused_build_leaves_nothing(spec, reason, **kwargs):
    """`build` with `fused=True` (and `kwargs`) raises naming `reason` and
    builds nothing, and so does `apply` (which builds first); with
    `fused=None` the same optimizer then builds as usual."""
    variable = keras.Variable(np.ones((4, 3), "float32"))
    optimizer = spec.make(fused=True, **kwargs)
    assert_refused_changing_nothing(
        lambda: optimizer.build([variable]),
        fused_refusal(reason),
        optimizer,
        [variable],
    )
    assert_refused_changing_nothing(
        lambda: optimizer.apply([keras.ops.ones((4, 3))], [variable]),
        fused_refusal(reason),
        optimizer,
        [variable],
    )
    optimizer.fused = None
    optimizer.build([variable])
    assert optimizer.get_slots(variable)


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the backend without a fused path"
)
@pytest.mark.parametrize("spec", SPECS)
def test_fused_true_is_refused_at_build_on_jax(spec):
    refused_build_leaves_nothing(spec, f"the backend is {keras.backend.backend()!r}")


@requires_tensorflow
@pytest.mark.parametrize("spec", SPECS)
def test_fused_true_is_refused_at_build_with_op_determinism(spec):
    with op_determinism():
        refused_build_leaves_nothing(spec, "op determinism is enabled")


@requires_tensorflow
@pytest.mark.parametrize("spec", SPECS)
def test_fused_true_is_refused_at_build_under_tf_distribute(spec):
    import tensorflow as tf

    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        refused_build_leaves_nothing(spec, "a tf.distribute strategy is in use")


@requires_tensorflow
@pytest.mark.parametrize("spec", SPECS)
def test_fused_true_is_refused_at_apply_in_eager_mode(spec):
    """Built (the context of later updates is not known at build time),
    then refused by an eager `apply`, which changes no variable."""
    variable = keras.Variable(np.ones((4, 3), "float32"))
    optimizer = spec.make(fused=True)
    optimizer.build([variable])
    assert_refused_changing_nothing(
        lambda: optimizer.apply([keras.ops.ones((4, 3))], [variable]),
        fused_refusal("the update runs eagerly, outside any tf.function"),
        optimizer,
        [variable],
    )
    assert int(to_numpy(optimizer.iterations)) == 0


@requires_tensorflow
@pytest.mark.parametrize("spec", SPECS)
def test_fused_true_runs_the_kernel_inside_a_tf_function(spec, monkeypatch):
    """Where the kernel exists, `fused=True` uses it, as `None` does: the
    same numbers."""
    from keras_soma import _fused

    kernels = []
    original = _fused.update_many

    def counted(batch):
        kernels.append(len(batch))
        original(batch)

    monkeypatch.setattr(_fused, "update_many", counted)
    rng = np.random.default_rng(0)
    initial = rng.standard_normal((4, 3)).astype("float32")
    gradients = [random_gradient(rng, (4, 3)) for _ in range(3)]
    results = {}
    for fused in (True, None):
        variable = keras.Variable(initial)
        optimizer = spec.make(learning_rate=0.01, fused=fused)
        optimizer.build([variable])
        step = make_stepper(optimizer, [variable], "compiled")
        for gradient in gradients:
            step([gradient])
        results[fused] = [to_numpy(variable)] + [
            to_numpy(value) for value in optimizer.variables
        ]
    assert kernels == [1, 1]  # one kernel per trace, of the one variable
    for with_true, with_none in zip(results[True], results[None]):
        np.testing.assert_array_equal(with_true, with_none)


def count_torch_steps(monkeypatch):
    """The calls of the multi-tensor torch updates (`_torch_step`), by
    name, from now on."""
    from keras_soma import _torch_step

    calls = []
    for name in ("soma", "soma_int8", "gradsign", "sm3"):
        original = getattr(_torch_step, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(_torch_step, name, counted)
    return calls


def torch_step_missing(spec) -> str | None:
    """Why the row's optimizer has no multi-tensor torch step (SM3's
    `_torch_step_missing`), or None where it has one."""
    return getattr(spec.make(), "_torch_step_missing", lambda: None)()


@requires_torch
@pytest.mark.parametrize("spec", SPECS)
def test_fused_takes_the_multi_tensor_torch_path_in_eager_mode(spec, monkeypatch):
    """On PyTorch in eager mode (`fit`'s default there), `fused=None` and
    `fused=True` update every variable of a step in one multi-tensor call,
    `fused=False` op by op, and the numbers agree: exactly between `True`
    and `None`, to rounding with `False`. With `weight_decay` the decay
    is folded in as on the other paths."""
    calls = count_torch_steps(monkeypatch)
    rng = np.random.default_rng(0)
    shapes = [(5, 4), (4,), (), (3, 2, 4)]
    initial = [rng.standard_normal(shape).astype("float32") for shape in shapes]
    gradients = [[random_gradient(rng, shape) for shape in shapes] for _ in range(4)]
    # SM3 without a multi-tensor step for this row refuses `fused=True`
    # (and runs op by op with `None`); every other row has one.
    missing = torch_step_missing(spec)
    if missing is not None:
        variables = [keras.Variable(value) for value in initial]
        refused = spec.make(learning_rate=0.01, fused=True)
        assert_refused_changing_nothing(
            lambda: refused.build(variables), "fused", refused, variables
        )
    results, counts = {}, {}
    for fused in (None, False) if missing else (True, None, False):
        variables = [keras.Variable(value) for value in initial]
        optimizer = spec.make(learning_rate=0.01, weight_decay=0.1, fused=fused)
        before = len(calls)
        for step in gradients:
            optimizer.apply([keras.ops.convert_to_tensor(g) for g in step], variables)
        counts[fused] = len(calls) - before
        results[fused] = [to_numpy(v) for v in [*variables, *optimizer.variables]]
    if missing is not None:
        assert counts == {None: 0, False: 0}
        results[True] = results[None]
    else:
        assert counts == {True: 4, None: 4, False: 0}
    for with_true, with_none, with_false in zip(
        results[True], results[None], results[False]
    ):
        np.testing.assert_array_equal(with_true, with_none)
        np.testing.assert_allclose(
            with_none.astype("float64"),
            with_false.astype("float64"),
            rtol=TOLERANCE["float32"],
            atol=TOLERANCE["float32"],
        )


@requires_torch
@pytest.mark.parametrize("spec", SPECS)
def test_fused_true_under_torch_compile_is_the_compiled_step(spec, monkeypatch):
    """Under torch.compile (`fit(jit_compile=True)`) `fused=True` is not
    refused: the `keras.ops` update is traced into the compiled step, which
    fuses it, rather than the multi-tensor update (whose checks of values
    would split the graph). The numbers are eager mode's."""
    if torch_step_missing(spec) is not None:
        pytest.skip(
            "no multi-tensor torch step for this row: fused=True is refused "
            "(test_fused_takes_the_multi_tensor_torch_path_in_eager_mode)"
        )
    calls = count_torch_steps(monkeypatch)
    rng = np.random.default_rng(0)
    initial = rng.standard_normal((4, 3)).astype("float32")
    gradients = [random_gradient(rng, (4, 3)) for _ in range(2)]
    results = {}
    for mode in ("compiled", "eager"):
        variable = keras.Variable(initial)
        optimizer = spec.make(learning_rate=0.01, fused=True)
        optimizer.build([variable])
        step = make_stepper(optimizer, [variable], mode)
        before = len(calls)
        for gradient in gradients:
            step([gradient])
        results[mode] = (len(calls) - before, to_numpy(variable))
    assert results["compiled"][0] == 0
    assert results["eager"][0] == 2
    np.testing.assert_allclose(
        results["compiled"][1],
        results["eager"][1],
        rtol=TOLERANCE["float32"],
        atol=TOLERANCE["float32"],
    )


@requires_torch
@pytest.mark.parametrize(
    "arguments",
    [
        dict(cls=keras_soma.Soma),
        dict(cls=keras_soma.Soma, momentum_dtype="bfloat16"),
        dict(cls=keras_soma.Soma, momentum_dtype="int8", block_size=3),
        dict(cls=keras_soma.Soma, momentum_dtype="int8", block_size=4),
        dict(cls=keras_soma.GradSign),
        dict(cls=keras_soma.SM3),
        dict(cls=keras_soma.SM3, momentum=0.0, beta_2=0.99),
        dict(cls=keras_soma.SM3, momentum_dtype="int8", block_size=3),
        dict(cls=keras_soma.SM3, momentum_dtype="int8", block_size=4),
    ],
    ids=[
        "soma",
        "soma-bfloat16",
        "soma-int8-block3",
        "soma-int8-block4",
        "gradsign",
        "sm3",
        "sm3-momentum0-beta0.99",
        "sm3-int8-block3",
        "sm3-int8-block4",
    ],
)
def test_multi_tensor_torch_step_in_chunks_equals_whole(arguments, monkeypatch):
    """The multi-tensor torch step makes its temporaries `CHUNK` elements
    at a time (SM3: blocks of rows of about `CHUNK` elements; int8 Soma:
    whole blocks, as many as fit), so that a table's step adds a chunk to
    the peak rather than a table-sized copy: with chunks of 7 elements
    (variables of 20 and 24 elements in 3 and 4 pieces, a last piece
    short; SM3's rows of 4 and 8 one or two at a time, with an int8
    momentum whole blocks of rows: 3 rows of 4 or 8 for blocks of 3, one
    row for blocks of 4; int8 Soma's blocks of 3 two at a time, of 4 one at
    a time, a last block partial) the numbers
    are those of one piece per variable, bit for bit, with weight decay
    and a non-contiguous gradient."""
    from keras_soma import _torch_step

    calls = count_torch_steps(monkeypatch)
    arguments = dict(arguments)
    cls = arguments.pop("cls")
    rng = np.random.default_rng(0)
    shapes = [(5, 4), (4,), (3, 2, 4)]
    initial = [rng.standard_normal(shape).astype("float32") for shape in shapes]
    gradients = [[random_gradient(rng, shape) for shape in shapes] for _ in range(3)]
    results = {}
    whole = _torch_step.CHUNK
    for chunk in (whole, 7):
        monkeypatch.setattr(_torch_step, "CHUNK", chunk)
        variables = [keras.Variable(value) for value in initial]
        optimizer = cls(learning_rate=0.01, weight_decay=0.1, **arguments)
        for step in gradients:
            tensors = [keras.ops.convert_to_tensor(g) for g in step]
            # A transposed gradient: not contiguous, read through a copy.
            tensors[0] = keras.ops.convert_to_tensor(step[0].T.copy()).T
            assert not tensors[0].is_contiguous()
            optimizer.apply(tensors, variables)
        results[chunk] = [to_numpy(v) for v in [*variables, *optimizer.variables]]
    assert len(calls) == 6
    assert max(len(shape) and np.prod(shape) for shape in shapes) > 3 * 7
    for in_one, in_pieces in zip(results[whole], results[7]):
        np.testing.assert_array_equal(in_one, in_pieces)
    # The run moved the weights: a step that did nothing would pass above.
    assert not np.array_equal(results[7][0], initial[0])


# ---------------------------------------------------------------------------
# float8 training
# ---------------------------------------------------------------------------


def float8_model(dtype):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", dtype=dtype, name="hidden"),
            keras.layers.Dense(1, name="output"),
        ]
    )


@pytest.mark.parametrize("spec", SPECS)
def test_float8_scale_variables_get_no_state(spec):
    """Keras overwrites a float8 layer's scale and amax-history variables
    with their gradients and never passes them to `update_step`; as with
    Keras's own optimizers, they get no state, and the other variables get
    what they would get without float8."""
    model = float8_model("float8_from_float32")
    overwritten = [
        variable
        for variable in model.trainable_variables
        if getattr(variable, "overwrite_with_gradient", False)
    ]
    assert overwritten, "a float8 Dense layer no longer sets overwrite_with_gradient"
    trained = [
        variable
        for variable in model.trainable_variables
        if not getattr(variable, "overwrite_with_gradient", False)
    ]
    optimizer = spec.make(learning_rate=spec.fit_learning_rate)
    model.compile(optimizer=optimizer, loss="mse")
    inputs, targets = regression_problem()
    initial = model.evaluate(inputs, targets, verbose=0)
    history = [to_numpy(variable) for variable in overwritten]
    model.fit(inputs, targets, epochs=2, batch_size=32, verbose=0)
    final = model.evaluate(inputs, targets, verbose=0)
    assert np.isfinite(final) and final < initial, (initial, final)
    # Keras did overwrite them (the float8 path ran).
    assert any(
        not np.array_equal(before, to_numpy(variable))
        for before, variable in zip(history, overwritten)
    )
    for variable in overwritten:
        assert optimizer.get_slots(variable) == {}, variable.path
    for variable in trained:
        assert optimizer.get_slots(variable), variable.path

    plain = float8_model("float32")
    plain_optimizer = spec.make(learning_rate=spec.fit_learning_rate)
    plain_optimizer.build(plain.trainable_variables)
    assert len(optimizer.variables) == len(plain_optimizer.variables)
    assert state_bytes_per_parameter(optimizer, trained) == state_bytes_per_parameter(
        plain_optimizer, plain.trainable_variables
    )
