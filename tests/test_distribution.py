"""Optimizer state that follows its variable, through the engines Keras
supports, for every optimizer in `registry.REGISTRY`:

* TensorFlow, tf.distribute: under MirroredStrategy over two logical CPUs
  (set up by conftest.py) every state tensor and every PolyakAveraging
  average is mirrored on its variable's devices, the replicas agree, and
  training equals one device with the same global batch. Under
  MultiWorkerMirroredStrategy two worker processes on localhost end with
  identical weights, state and averages.
* TensorFlow, XLA (the stand-in for TPUStrategy, which cannot run here):
  every update step compiles with `jit_compile=True` and is traced once.
* JAX, keras.distribution over two host devices (XLA_FLAGS, set by
  conftest.py): with DataParallel and with ModelParallel + LayoutMap each
  state tensor of its variable's shape has its variable's sharding, SM3's
  per-axis accumulators have the sharding of the axis they summarize, and
  training equals one device.
* JAX, several processes: two processes of two host devices each
  (`distributed_processes.py`, `keras.distribution.initialize` over
  loopback, gloo) train every optimizer under DataParallel and under
  ModelParallel on a 2 x 2 mesh as one device does.
"""

from __future__ import annotations

import contextlib
import os
import sys

import keras
import numpy as np
import pytest
from conftest import LOGICAL_CPUS, requires_jax, requires_tensorflow
from helpers import (
    MODEL_PARALLEL_LAYOUTS,
    TOLERANCE,
    distribution_over,
    free_local_ports,
    jax_model,
    regression_data,
    run_processes,
    to_numpy,
)
from registry import CONTRACT_ROWS, REGISTRY

import keras_soma
from keras_soma._reference import numpy_dtype

SPECS = [pytest.param(spec, id=name) for name, spec in REGISTRY.items()]
# Each optimizer with its defaults and with its registry `config_case`
# (other state dtypes, skip_nonfinite, other variants).
SPEC_CONFIGS = [
    pytest.param(spec, arguments, id=f"{name}-{label}")
    for name, spec in REGISTRY.items()
    for label, arguments in (("defaults", {}), ("config_case", spec.config_case))
]
SPARSE_SPECS = [
    pytest.param(spec, id=name)
    for name, spec in CONTRACT_ROWS.items()
    if spec.sparse_reference_step is not None
]
TESTS_DIRECTORY = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(TESTS_DIRECTORY)


def assert_values_close(actual, expected, message):
    """Equal for integers; for floats to the rounding of their dtype (the
    all-reduce sums gradients in another order than one device does)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (message, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (message, actual.shape, expected.shape)
    if not np.issubdtype(actual.dtype, np.floating) and actual.dtype != numpy_dtype(
        "bfloat16"
    ):
        np.testing.assert_array_equal(actual, expected, err_msg=message)
        return
    tolerance = max(TOLERANCE.get(str(actual.dtype), 0.0), 1e-5)
    np.testing.assert_allclose(
        actual.astype(np.float64),
        expected.astype(np.float64),
        rtol=tolerance,
        atol=tolerance,
        err_msg=message,
    )


# ---------------------------------------------------------------------------
# TensorFlow: MirroredStrategy over two logical CPUs
# ---------------------------------------------------------------------------


def mirrored_strategy():
    """MirroredStrategy over the logical CPUs, all-reducing by reduction
    to one device and broadcast.

    Not with its default collective all-reduce: TensorFlow numbers the
    collective operations of every strategy in a process from the same
    start, so two strategies whose models differ (as in consecutive tests)
    reuse a number with another tensor shape, which aborts every collective
    operation of the process ("Shape mismatch in the collective instance").
    The MultiWorkerMirroredStrategy test below runs collectives, in
    processes of its own.
    """
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(
        [f"/cpu:{index}" for index in range(LOGICAL_CPUS)],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )


def train_tensorflow(spec, arguments, strategy=None, epochs=2):
    """A small MLP trained with `fit` (global batch 16), inside `strategy`
    when one is given; returns the model and its PolyakAveraging."""
    keras.utils.set_random_seed(0)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="tanh"),
                keras.layers.Dense(4),
            ]
        )
        arguments = {"learning_rate": spec.fit_learning_rate, **arguments}
        model.compile(optimizer=spec.cls(**arguments), loss="mse")
    averaging = keras_soma.PolyakAveraging(decay=0.9)
    inputs, targets = regression_data()
    model.fit(
        inputs,
        targets,
        batch_size=16,
        epochs=epochs,
        shuffle=False,
        callbacks=[averaging],
        verbose=0,
    )
    return model, averaging


def local_values(strategy, variable):
    """The per-device copies of a (Keras) variable under `strategy`."""
    import tensorflow as tf

    native = variable.value if isinstance(variable, keras.Variable) else variable
    assert isinstance(native, tf.distribute.DistributedValues), variable.path
    return strategy.experimental_local_results(native)


def assert_mirrored_with(strategy, state, variable, message):
    """`state` has one copy on each device of `variable`, all equal."""
    copies = local_values(strategy, state)
    devices = [copy.device for copy in copies]
    assert len(copies) == LOGICAL_CPUS, message
    assert devices == [copy.device for copy in local_values(strategy, variable)], (
        message,
        devices,
    )
    assert len(set(devices)) == LOGICAL_CPUS, (message, devices)
    first = copies[0].numpy()
    for copy in copies[1:]:
        np.testing.assert_array_equal(copy.numpy(), first, err_msg=message)


@requires_tensorflow
@pytest.mark.parametrize("spec, arguments", SPEC_CONFIGS)
def test_mirrored_state_follows_its_variable_and_training_equals_one_device(
    spec, arguments
):
    strategy = mirrored_strategy()
    model, averaging = train_tensorflow(spec, arguments, strategy)
    optimizer = model.optimizer
    for variable in model.trainable_variables:
        slots = optimizer.get_slots(variable)
        assert slots, variable.path
        for name, state in slots.items():
            assert_mirrored_with(strategy, state, variable, f"{variable.path} {name}")
    for average, variable in zip(averaging.averages, model.trainable_variables):
        assert_mirrored_with(strategy, average, variable, f"average {variable.path}")
    for state in optimizer.variables:  # the step counter and the rest too
        copies = local_values(strategy, state)
        assert len(copies) == LOGICAL_CPUS, state.path

    single, single_averaging = train_tensorflow(spec, arguments)
    assert int(to_numpy(optimizer.iterations)) == 8
    for actual, expected in zip(model.trainable_variables, single.trainable_variables):
        assert_values_close(to_numpy(actual), to_numpy(expected), actual.path)
    assert len(optimizer.variables) == len(single.optimizer.variables)
    for actual, expected in zip(optimizer.variables, single.optimizer.variables):
        assert_values_close(to_numpy(actual), to_numpy(expected), actual.path)
    for actual, expected in zip(averaging.averages, single_averaging.averages):
        assert_values_close(to_numpy(actual), to_numpy(expected), "average")


@requires_tensorflow
@pytest.mark.parametrize(
    "arguments",
    [
        {"gradient_accumulation_steps": 2},
        {"gradient_accumulation_steps": 4, "use_ema": True, "skip_nonfinite": True},
    ],
    ids=["accumulation", "accumulation-ema-skip"],
)
def test_mirrored_folded_accumulation_equals_one_device(arguments):
    """Soma folds accumulation into its average under MirroredStrategy too
    (no accumulator; the replicas trace Keras's step one after the other
    while Soma hides `gradient_accumulation_steps` from it)."""
    spec = REGISTRY["Soma"]
    model, _ = train_tensorflow(spec, arguments, mirrored_strategy())
    single, _ = train_tensorflow(spec, arguments)
    optimizer = model.optimizer
    steps = arguments["gradient_accumulation_steps"]
    assert int(to_numpy(optimizer.iterations)) == 8 // steps
    assert not any("gradient_accumulator" in v.path for v in optimizer.variables)
    kernel = model.trainable_variables[0]
    assert to_numpy(optimizer.get_slots(kernel)["momentum"]).any(), "no update"
    for actual, expected in zip(model.trainable_variables, single.trainable_variables):
        assert_values_close(to_numpy(actual), to_numpy(expected), actual.path)
    assert len(optimizer.variables) == len(single.optimizer.variables)
    for actual, expected in zip(optimizer.variables, single.optimizer.variables):
        assert_values_close(to_numpy(actual), to_numpy(expected), actual.path)


@requires_tensorflow
@pytest.mark.parametrize("spec", SPARSE_SPECS)
def test_mirrored_row_path_equals_one_device(spec):
    """An Embedding's row-sliced gradients, all-reduced by the strategy,
    take the row path on each replica: the same rows move as on one
    device, by the same amounts, and the others stay as they were."""
    inputs = np.array([[1, 2, 3], [3, 4, 1], [7, 1, 2], [2, 9, 9]], "int32")
    targets = np.ones((4, 1), "float32")

    def train(strategy):
        keras.utils.set_random_seed(0)
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with scope:
            model = keras.Sequential(
                [
                    keras.Input((3,), dtype="int32"),
                    keras.layers.Embedding(50, 4),
                    keras.layers.Flatten(),
                    keras.layers.Dense(1),
                ]
            )
            model.compile(
                optimizer=spec.make(learning_rate=0.05, **spec.sparse_arguments),
                loss="mse",
            )
        before = to_numpy(model.layers[0].embeddings).copy()
        model.fit(inputs, targets, batch_size=4, epochs=3, shuffle=False, verbose=0)
        return model, before

    strategy = mirrored_strategy()
    model, before = train(strategy)
    single, _ = train(None)
    table = model.layers[0].embeddings
    untouched = np.setdiff1d(np.arange(50), inputs)
    np.testing.assert_array_equal(to_numpy(table)[untouched], before[untouched])
    assert (to_numpy(table)[np.unique(inputs)] != before[np.unique(inputs)]).any()
    for name, state in model.optimizer.get_slots(table).items():
        assert_mirrored_with(strategy, state, table, name)
    for actual, expected in zip(model.optimizer.variables, single.optimizer.variables):
        assert_values_close(to_numpy(actual), to_numpy(expected), actual.path)
    for actual, expected in zip(model.trainable_variables, single.trainable_variables):
        assert_values_close(to_numpy(actual), to_numpy(expected), actual.path)


# ---------------------------------------------------------------------------
# TensorFlow: MultiWorkerMirroredStrategy, two worker processes on localhost
# ---------------------------------------------------------------------------

# The whole run, both workers together, stops by itself after this long.
MULTI_WORKER_TIMEOUT_SECONDS = 120


def run_workers(tmp_path):
    """Starts both workers and waits for them, at most the timeout; ends
    both as soon as one fails or the time is up. Returns their outputs."""
    ports = ",".join(str(port) for port in free_local_ports(2))
    environment = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    environment.pop("TF_CONFIG", None)
    shared_data = os.path.join(
        os.path.dirname(REPOSITORY), "shared", "tensorflow_datasets"
    )
    if "TFDS_DATA_DIR" not in environment and os.path.isdir(shared_data):
        environment["TFDS_DATA_DIR"] = shared_data
    outputs = [str(tmp_path / f"worker_{index}.npz") for index in range(2)]
    script = os.path.join(TESTS_DIRECTORY, "multi_worker_run.py")
    run_processes(
        [
            [
                sys.executable,
                script,
                str(index),
                ports,
                outputs[index],
                "--timeout",
                str(MULTI_WORKER_TIMEOUT_SECONDS - 5),
            ]
            for index in range(2)
        ],
        environment,
        [tmp_path / f"worker_{index}.log" for index in range(2)],
        MULTI_WORKER_TIMEOUT_SECONDS,
    )
    return [np.load(output) for output in outputs]


@requires_tensorflow
def test_multi_worker_training_ends_identical_on_both_workers(tmp_path):
    first, second = run_workers(tmp_path)
    assert sorted(first.files) == sorted(second.files)
    for key in first.files:
        assert first[key].dtype == second[key].dtype, key
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    runs = {key.split("/")[0] for key in first.files if "/" in key}
    assert set(REGISTRY) <= runs
    assert any(run.endswith("-config_case") for run in runs), runs
    for name in REGISTRY:
        for run in runs & {name, f"{name}-config_case"}:
            keys = [key for key in first.files if key.startswith(f"{run}/")]
            assert any("/optimizer/" in key and "iteration" in key for key in keys)
            assert any("/average/" in key for key in keys), run
            assert first[f"{run}/final_loss"] < first[f"{run}/initial_loss"], run
        # The full run learns: cross-entropy well below log(10) = 2.3.
        assert first[f"{name}/final_loss"] < 1.2, (name, first[f"{name}/final_loss"])
    # State of a dtype TensorFlow cannot broadcast between workers is
    # stored wider, holding values of its own dtype: GradSign's int8
    # counters as int32, bfloat16 momentum as float32.
    counters = [key for key in first.files if key.endswith("_sign_counter")]
    assert counters, "no GradSign counters in the output"
    for key in counters:
        assert first[key].dtype == np.int32, key
        assert first[key].min() >= -61 and first[key].max() <= 60, key
    checked = []
    for name, spec in REGISTRY.items():
        # A bfloat16 momentum, where there is one (SM3's config case has
        # momentum 0, so no momentum state).
        if (
            spec.config_case.get("momentum_dtype") != "bfloat16"
            or spec.config_case.get("momentum") == 0.0
        ):
            continue
        checked.append(name)
        prefix = f"{name}-config_case/optimizer/"
        momentums = [
            key
            for key in first.files
            if key.startswith(prefix) and key.endswith("_momentum")
        ]
        assert momentums, name
        for key in momentums:
            values = first[key]
            assert values.dtype == np.float32, key
            rounded = values.astype(numpy_dtype("bfloat16")).astype(np.float32)
            np.testing.assert_array_equal(values, rounded, err_msg=key)
            assert values.any(), key
    assert checked, "no optimizer with a bfloat16 momentum in the config cases"


# ---------------------------------------------------------------------------
# TensorFlow: XLA, the stand-in for TPUStrategy
# ---------------------------------------------------------------------------

XLA_SHAPES = [(5, 3), (3,), (), (2, 3, 2)]


def xla_arguments(spec):
    """The defaults, and a run with every option that adds work to the
    step: skip_nonfinite, weight decay and a schedule."""
    schedule = keras.optimizers.schedules.ExponentialDecay(
        spec.fit_learning_rate, decay_steps=2, decay_rate=0.5
    )
    return [
        {},
        {"skip_nonfinite": True, "weight_decay": 0.01, "learning_rate": schedule},
    ]


@requires_tensorflow
@pytest.mark.parametrize("options", [0, 1], ids=["defaults", "all_options"])
@pytest.mark.parametrize("spec", SPECS)
def test_update_step_compiles_under_xla_and_is_traced_once(spec, options):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    arguments = xla_arguments(spec)[options]
    initial = [rng.standard_normal(shape).astype("float32") for shape in XLA_SHAPES]
    variables = [keras.Variable(value) for value in initial]
    reference_variables = [keras.Variable(value) for value in initial]
    optimizer = spec.cls(**arguments)
    # Built first, as fit does: a tf.function that creates variables on
    # its first call is traced a second time by design.
    optimizer.build(variables)
    reference = spec.cls(fused=False, **arguments)

    @tf.function(jit_compile=True)
    def compiled_step(gradients):
        optimizer.apply(gradients, variables)

    for step in range(4):
        gradients = [
            rng.standard_normal(shape).astype("float32") for shape in XLA_SHAPES
        ]
        if step == 2 and arguments.get("skip_nonfinite"):
            gradients[0][0, 0] = np.nan  # a skipped step, same trace
        compiled_step([tf.constant(gradient) for gradient in gradients])
        reference.apply(
            [tf.constant(gradient) for gradient in gradients], reference_variables
        )
    # Traced once for four steps, and compiled whole by XLA (with
    # jit_compile=True any op XLA cannot compile is an error, not a
    # fallback to the host).
    assert compiled_step.experimental_get_tracing_count() == 1
    hlo = compiled_step.experimental_get_compiler_ir(
        [tf.constant(np.zeros(shape, "float32")) for shape in XLA_SHAPES]
    )(stage="hlo")
    assert "HloModule" in hlo
    for actual, expected in zip(variables, reference_variables):
        assert_values_close(to_numpy(actual), to_numpy(expected), "variable")
    for actual, expected in zip(optimizer.variables, reference.variables):
        assert_values_close(to_numpy(actual), to_numpy(expected), actual.path)


@requires_tensorflow
@pytest.mark.parametrize("spec", SPARSE_SPECS)
def test_row_path_compiles_under_xla_and_is_traced_once(spec):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    initial = rng.standard_normal((30, 4)).astype("float32")
    variable, eager_variable = keras.Variable(initial), keras.Variable(initial)
    optimizer = spec.make(learning_rate=0.05, **spec.sparse_arguments)
    optimizer.build([variable])
    eager = spec.make(learning_rate=0.05, **spec.sparse_arguments)
    dense_shape = tf.constant([30, 4], "int64")

    @tf.function(jit_compile=True)
    def compiled_step(values, indices):
        optimizer.apply([tf.IndexedSlices(values, indices, dense_shape)], [variable])

    for _ in range(3):
        indices = tf.constant(rng.integers(0, 20, 6), "int64")
        values = tf.constant(rng.standard_normal((6, 4)).astype("float32"))
        compiled_step(values, indices)
        eager.apply([tf.IndexedSlices(values, indices, dense_shape)], [eager_variable])
    assert compiled_step.experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(to_numpy(variable)[20:], initial[20:])
    assert_values_close(to_numpy(variable), to_numpy(eager_variable), "variable")
    for actual, expected in zip(optimizer.variables, eager.variables):
        assert_values_close(to_numpy(actual), to_numpy(expected), actual.path)


@requires_tensorflow
@pytest.mark.parametrize("spec", SPECS)
def test_fit_with_jit_compile_keeps_xla_and_traces_the_update_once(spec):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(4),
        ]
    )
    optimizer = spec.cls(learning_rate=spec.fit_learning_rate)
    traces = []
    update_step = optimizer.update_step

    def counting_update_step(gradient, variable, learning_rate):
        traces.append(variable.name)  # runs once per trace, not per step
        return update_step(gradient, variable, learning_rate)

    optimizer.update_step = counting_update_step
    model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
    # Built first: a train function that creates the optimizer's variables
    # on its first call is traced a second time, once, by design.
    optimizer.build(model.trainable_variables)
    inputs, targets = regression_data()
    history = model.fit(inputs, targets, batch_size=16, epochs=3, verbose=0)
    assert model.jit_compile is True  # not turned off for this model
    # One trace of the train step: each variable's update traced once.
    assert len(traces) == len(model.trainable_variables), traces
    assert len(set(traces)) == len(traces), traces
    model.fit(inputs, targets, batch_size=16, epochs=2, verbose=0)
    assert len(traces) == len(model.trainable_variables), traces
    assert int(to_numpy(optimizer.iterations)) == 20
    assert history.history["loss"][-1] < history.history["loss"][0]


# ---------------------------------------------------------------------------
# JAX: keras.distribution over two host devices
# ---------------------------------------------------------------------------

DISTRIBUTIONS = ["data_parallel", "model_parallel"]


def jax_distribution(kind):
    import jax

    devices = keras.distribution.list_devices("cpu")
    if len(devices) < 2 or len(jax.devices()) < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2")
    return distribution_over(kind, devices[:2], batch_groups=1)


def sharding_of(variable):
    return variable.value.sharding


def axis_sharding(variable, axis):
    """What the per-axis state of `variable` along `axis` must have: the
    variable's sharding of that axis, on its mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = sharding_of(variable)
    spec = tuple(sharding.spec) + (None,) * (len(variable.shape) - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(spec[axis]))


def assert_state_follows(optimizer, variable, message=""):
    """Every state tensor of `variable` has its sharding (per-axis state:
    that of its axis), and the model parallel layouts really shard."""
    variable_sharding = sharding_of(variable)
    slots = optimizer.get_slots(variable)
    assert slots, variable.path
    for name, state in slots.items():
        context = f"{variable.path} {name} {message}"
        if tuple(state.shape) == tuple(variable.shape):
            assert sharding_of(state).is_equivalent_to(
                variable_sharding, len(variable.shape)
            ), (context, sharding_of(state), variable_sharding)
        else:
            # SM3's accumulator_<axis>: one number per index of that axis.
            axis = int(name.rsplit("_", 1)[1])
            assert tuple(state.shape) == (variable.shape[axis],), context
            expected = axis_sharding(variable, axis)
            assert sharding_of(state).is_equivalent_to(expected, 1), (
                context,
                sharding_of(state),
                expected,
            )


def assert_model_parallel_layouts_applied(model):
    sharded = [
        variable.path
        for variable in model.trainable_variables
        if any(axis is not None for axis in sharding_of(variable).spec)
    ]
    assert len(sharded) == len(MODEL_PARALLEL_LAYOUTS), sharded


def optimizer_cases():
    """(spec, constructor arguments) for each registry reference case."""

    def case_id(case):
        return "-".join(f"{key}={value}" for key, value in case.items()) or "defaults"

    return [
        pytest.param(spec, case, id=f"{name}-{case_id(case)}")
        for name, spec in REGISTRY.items()
        for case in spec.reference_cases
    ]


@requires_jax
@pytest.mark.parametrize("kind", DISTRIBUTIONS)
@pytest.mark.parametrize("spec, case", optimizer_cases())
def test_jax_state_carries_its_variables_layout(spec, case, kind):
    distribution = jax_distribution(kind)
    with distribution.scope():
        model = jax_model()
        optimizer = spec.cls(**case)
        optimizer.build(model.trainable_variables)
    if kind == "model_parallel":
        assert_model_parallel_layouts_applied(model)
    for variable in model.trainable_variables:
        assert_state_follows(optimizer, variable)


@requires_jax
@pytest.mark.parametrize("kind", DISTRIBUTIONS)
@pytest.mark.parametrize("spec, arguments", SPEC_CONFIGS)
def test_jax_distributed_training_equals_one_device(spec, arguments, kind):
    inputs, targets = regression_data(outputs=4)

    def train(distribution):
        scope = distribution.scope() if distribution else contextlib.nullcontext()
        with scope:
            model = jax_model()
            arguments_with_rate = {"learning_rate": spec.fit_learning_rate, **arguments}
            model.compile(optimizer=spec.cls(**arguments_with_rate), loss="mse")
            model.fit(
                inputs, targets, batch_size=16, epochs=2, shuffle=False, verbose=0
            )
        return model

    distributed = train(jax_distribution(kind))
    single = train(None)
    optimizer = distributed.optimizer
    assert int(to_numpy(optimizer.iterations)) == 8
    if kind == "model_parallel":
        assert_model_parallel_layouts_applied(distributed)
    for variable in distributed.trainable_variables:
        assert_state_follows(optimizer, variable, "after training")
    for actual, expected in zip(
        distributed.trainable_variables, single.trainable_variables
    ):
        assert_values_close(to_numpy(actual), to_numpy(expected), actual.path)
    for actual, expected in zip(optimizer.variables, single.optimizer.variables):
        assert_values_close(to_numpy(actual), to_numpy(expected), actual.path)


@requires_jax
@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_jax_polyak_averages_carry_their_weights_layout(kind):
    import keras_soma

    inputs, targets = regression_data(outputs=4)
    distribution = jax_distribution(kind)
    with distribution.scope():
        model = jax_model()
        model.compile(optimizer=keras_soma.Soma(learning_rate=1e-2), loss="mse")
        averaging = keras_soma.PolyakAveraging(decay=0.9)
        model.fit(
            inputs,
            targets,
            batch_size=16,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[averaging],
        )
    if kind == "model_parallel":
        assert_model_parallel_layouts_applied(model)
    assert averaging.num_updates == 4
    for weight, average in zip(model.trainable_variables, averaging.averages):
        assert sharding_of(average).is_equivalent_to(
            sharding_of(weight), len(weight.shape)
        ), (weight.path, sharding_of(average), sharding_of(weight))


MULTI_PROCESS_TIMEOUT_SECONDS = 480


@pytest.mark.slow
@requires_jax
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="gloo CPU collectives (Linux)"
)
def test_two_processes_equal_one_device(tmp_path):
    """Every optimizer (defaults, its registry config case, int8 momenta)
    trained by 2 processes x 2 host devices (`keras.distribution
    .initialize` over loopback, gloo), under DataParallel and under
    ModelParallel on a 2 x 2 mesh, ends with the weights and optimizer
    variables of one device trained on the same global batches: both
    processes hold the same values."""
    import json

    import distributed_processes as worker

    (port,) = free_local_ports(1)
    output = str(tmp_path / "processes.npz")
    environment = {**os.environ, "PYTHONPATH": REPOSITORY}
    environment.pop("XLA_FLAGS", None)
    script = os.path.join(TESTS_DIRECTORY, "distributed_processes.py")
    run_processes(
        [[sys.executable, script, str(index), str(port), output] for index in range(2)],
        environment,
        [tmp_path / f"process_{index}.log" for index in range(2)],
        MULTI_PROCESS_TIMEOUT_SECONDS,
    )
    result = np.load(output)
    other = np.load(output + ".process1.npz")
    dtypes = json.loads(str(result["dtypes"]))
    inputs, targets = regression_data(outputs=4)
    checked = 0
    for case_name, cls, arguments in worker.cases():
        model = jax_model()
        model.compile(optimizer=cls(**arguments), loss="mse")
        model.fit(
            inputs,
            targets,
            batch_size=worker.GLOBAL_BATCH,
            epochs=worker.EPOCHS,
            shuffle=False,
            verbose=0,
        )
        single = {
            "weight": [to_numpy(v) for v in model.trainable_variables],
            "state": [to_numpy(v) for v in model.optimizer.variables],
        }
        for kind in worker.KINDS:
            for group, values in single.items():
                for number, expected in enumerate(values):
                    name = f"{worker.key(case_name, kind)}/{group}/{number}"
                    assert dtypes[name] == str(expected.dtype), name
                    actual = result[name].astype(expected.dtype)
                    assert_values_close(actual, expected, name)
                    np.testing.assert_array_equal(other[name], result[name], name)
                    checked += 1
    # Nothing left unchecked: as many arrays as the processes wrote.
    assert checked == len(dtypes) == len(result.files) - 1
