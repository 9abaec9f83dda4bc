"""Test helpers: stepping an optimizer eagerly or compiled on any
backend, random gradients, and comparisons with the numpy reference."""

from __future__ import annotations

import contextlib
import pathlib
import socket
import subprocess
import time
from collections.abc import Callable

import keras
import numpy as np
import pytest

from keras_soma._reference import numpy_dtype

# Ways an update can run: op by op in eager mode, traced (on TensorFlow
# a tf.function: the fused kernel; on JAX jax.jit over stateless_apply; on
# PyTorch torch.compile over optimizer.apply, as Keras compiles a train
# step for jit_compile=True), and traced with the fused kernel turned off
# (TensorFlow only).
MODES = ["eager", "compiled", "compiled_unfused"]

# Relative/absolute tolerance of the comparison with the reference, by
# variable dtype: float32 agrees to rounding (XLA may contract a*b + c into
# one fused multiply-add), half precision to about one unit in the last
# place of the stored value.
TOLERANCE = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2, "float64": 1e-12}


def modes_for_backend() -> list[str]:
    if keras.backend.backend() == "tensorflow":
        return MODES
    return MODES[:2]


def random_gradient(rng, shape, dtype="float32", zero_fraction=0.1, scale=1.0):
    """Normal gradients with a fraction of exact zeros (sign(0) = 0)."""
    values = rng.standard_normal(shape) * scale
    values = np.where(rng.random(shape) < zero_fraction, 0.0, values)
    return np.asarray(values, dtype=np.float32).astype(numpy_dtype(dtype))


def make_stepper(optimizer, variables, mode: str) -> Callable:
    """Returns `step(gradients)` applying one update to `variables`."""
    backend = keras.backend.backend()
    if mode == "eager":

        def step(gradients):
            optimizer.apply(
                [keras.ops.convert_to_tensor(g) for g in gradients], variables
            )

        return step
    traces = []  # a Python side effect runs once per trace
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def compiled(gradients):
            traces.append(1)
            optimizer.apply(gradients, variables)

        def step(gradients):
            compiled([tf.convert_to_tensor(g) for g in gradients])

        step.trace_count = lambda: len(traces)
        return step
    if backend == "jax":
        return _jax_compiled_stepper(
            optimizer,
            variables,
            lambda gradients: [keras.ops.convert_to_tensor(g) for g in gradients],
        )
    if backend == "torch":
        return _torch_compiled_stepper(optimizer, variables)
    raise ValueError(f"mode {mode!r} is not available on backend {backend!r}")


def _jax_compiled_stepper(optimizer, variables, make_gradients) -> Callable:
    """`step(*arguments)`: `optimizer.stateless_apply` under `jax.jit` on
    the gradients `make_gradients(*arguments)` (built inside the trace),
    the results written back into the variables."""
    import jax

    traces = []  # a Python side effect runs once per trace
    optimizer.build(variables)

    @jax.jit
    def compiled(optimizer_values, variable_values, arguments):
        traces.append(1)
        return optimizer.stateless_apply(
            optimizer_values, make_gradients(*arguments), variable_values
        )

    def step(*arguments):
        new_variables, new_optimizer = compiled(
            [v.value for v in optimizer.variables],
            [v.value for v in variables],
            arguments,
        )
        for target, value in zip(variables, new_variables):
            target.assign(value)
        for target, value in zip(optimizer.variables, new_optimizer):
            target.assign(value)

    step.trace_count = lambda: len(traces)
    return step


# ---------------------------------------------------------------------------
# Sparse gradients
# ---------------------------------------------------------------------------


def compiled_step_memory(optimizer, variables, gradients):
    """XLA's `memory_analysis()` of a jitted `stateless_apply` step of a
    built `optimizer` on JAX, the variables and the optimizer's state
    donated (as Keras's JAX trainer donates its state), so that what is
    updated in place is not counted as temporaries."""
    import jax

    def step(variable_values, optimizer_values, gradient_values):
        return optimizer.stateless_apply(
            optimizer_values, gradient_values, variable_values
        )

    return (
        jax.jit(step, donate_argnums=(0, 1))
        .lower(
            [variable.value for variable in variables],
            [value.value for value in optimizer.variables],
            gradients,
        )
        .compile()
        .memory_analysis()
    )


def sparse_modes() -> list[str]:
    """Modes a sparse gradient can be applied in: eagerly everywhere, and
    traced on TensorFlow (tf.function) and JAX (jax.jit)."""
    if keras.backend.backend() in ("tensorflow", "jax"):
        return ["eager", "compiled"]
    return ["eager"]


def native_row_gradient(indices, values, shape):
    """The gradient of rows `indices` of a variable of `shape` (`values[i]`
    for row `indices[i]`, repeats summed) in the sparse form of the backend
    in use: a `tf.IndexedSlices` (an `Embedding` layer's gradient on
    TensorFlow), a `jax.experimental.sparse.BCOO` with one sparse dimension
    (what Keras's own sparse optimizer test applies on JAX), a torch sparse
    COO tensor with one sparse dimension, uncoalesced (what a
    `torch.nn.Embedding(sparse=True)` gives)."""
    backend = keras.backend.backend()
    shape = tuple(shape)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.IndexedSlices(
            tf.convert_to_tensor(values),
            tf.convert_to_tensor(indices),
            tf.constant(shape, "int64"),
        )
    if backend == "jax":
        import jax.numpy as jnp
        from jax.experimental import sparse as jax_sparse

        return jax_sparse.BCOO(
            (jnp.asarray(values), jnp.asarray(indices)[:, None]), shape=shape
        )
    if backend == "torch":
        import torch

        indices = keras.ops.convert_to_tensor(indices, "int64")
        return torch.sparse_coo_tensor(
            indices[None],
            keras.ops.convert_to_tensor(values),
            shape,
            check_invariants=True,
        )
    raise ValueError(f"no sparse gradient form on backend {backend!r}")


def native_elementwise_gradient(dense):
    """`dense` as a sparse gradient over every axis (not whole rows): a
    BCOO with `n_sparse` = rank on JAX, a torch sparse COO tensor with
    `sparse_dim` = rank on torch. TensorFlow has no such gradient form (its
    sparse gradients, tf.IndexedSlices, always name whole rows)."""
    backend = keras.backend.backend()
    if backend == "jax":
        from jax.experimental import sparse as jax_sparse

        return jax_sparse.BCOO.fromdense(keras.ops.convert_to_tensor(dense))
    if backend == "torch":
        return keras.ops.convert_to_tensor(dense).to_sparse()
    raise ValueError(f"no element-wise sparse gradient on backend {backend!r}")


def make_row_stepper(optimizer, variable, mode: str) -> Callable:
    """`step(indices, values)`: one update of `variable` with the gradient
    of rows `indices` in the backend's sparse form (`native_row_gradient`),
    applied eagerly or traced (`sparse_modes`)."""
    shape = tuple(variable.shape)

    def apply(indices, values):
        optimizer.apply([native_row_gradient(indices, values, shape)], [variable])

    backend = keras.backend.backend()
    if mode == "eager":
        return apply
    if mode == "compiled" and backend == "tensorflow":
        import tensorflow as tf

        return tf.function(apply)
    if mode == "compiled" and backend == "jax":
        return _jax_compiled_stepper(
            optimizer,
            [variable],
            lambda indices, values: [native_row_gradient(indices, values, shape)],
        )
    raise ValueError(f"mode {mode!r} is not available on backend {backend!r}")


def _torch_compiled_stepper(optimizer, variables) -> Callable:
    """`step(gradients)`: `optimizer.apply` under `torch.compile` with
    Inductor, torch.compile's default, as Keras compiles a train step for
    `jit_compile=True`; `step.trace_count()` counts the calls that
    compiled."""
    import torch
    from torch._inductor.compile_fx import compile_fx

    # Dynamo caches compiled code per code object, guarded on the objects
    # it closes over: the optimizers of earlier tests would count toward
    # its recompile limit, beyond which it silently runs the function
    # eagerly. Each stepper starts from an empty cache.
    torch._dynamo.reset()
    graphs, traces = [], []

    def inductor_counting_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return compile_fx(graph_module, example_inputs)

    @torch.compile(backend=inductor_counting_graphs)
    def compiled(gradients):
        with torch.no_grad():
            optimizer.apply(gradients, variables)

    def step(gradients):
        # Dynamo replays Python side effects on every call, so a trace is
        # a call during which a graph was compiled (a graph break splits
        # one trace into several graphs).
        graphs_before = len(graphs)
        compiled([keras.ops.convert_to_tensor(g) for g in gradients])
        if len(graphs) > graphs_before:
            traces.append(1)

    step.trace_count = lambda: len(traces)
    return step


def make_optimizer(spec, mode: str, **kwargs):
    if mode == "compiled_unfused":
        kwargs["fused"] = False
    return spec.make(**kwargs)


def to_numpy(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


def assert_state_close(
    optimizer, variable, reference_state: dict, dtype: str, context="", floor=0.0
):
    """Every slot against the reference, to the tolerance of its dtype (at
    least `floor`)."""
    slots = optimizer.get_slots(variable)
    assert sorted(slots) == sorted(reference_state), (
        f"slot names {sorted(slots)} != reference {sorted(reference_state)}"
    )
    for name, expected in reference_state.items():
        actual = to_numpy(slots[name])
        assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        tolerance = TOLERANCE.get(str(expected.dtype), 0)
        if tolerance:
            tolerance = max(tolerance, floor)
        np.testing.assert_allclose(
            actual.astype(np.float64),
            expected.astype(np.float64),
            rtol=tolerance,
            atol=tolerance,
            err_msg=f"slot {name!r} {context}",
        )


def assert_refused_changing_nothing(action, match, optimizer, variables):
    """Runs `action`, which must raise a ValueError matching `match`, and
    checks that it changed nothing: whether `optimizer` is built, how many
    variables it holds, their values and the values of `variables`."""
    built = optimizer.built
    count = len(optimizer.variables)
    before = [to_numpy(value) for value in [*variables, *optimizer.variables]]
    with pytest.raises(ValueError, match=match):
        action()
    assert optimizer.built == built
    assert len(optimizer.variables) == count
    after = [to_numpy(value) for value in [*variables, *optimizer.variables]]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old)


@contextlib.contextmanager
def op_determinism():
    """TensorFlow's op determinism, enabled for the block only."""
    import tensorflow as tf

    # TensorFlow exports only the setter; its own tests turn it off so.
    from tensorflow.python.framework import config

    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        config.disable_op_determinism()


def regression_data(samples=64, features=8, outputs=4, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((samples, features)).astype("float32")
    targets = np.tanh(inputs @ rng.standard_normal((features, outputs)))
    return inputs, targets.astype("float32")


# The model of the keras.distribution tests (JAX) and, for ModelParallel,
# (layer-name regex, sharding of its kernel / bias): a column-sharded
# matrix, a row-sharded one, a rank-3 kernel sharded on its first axis,
# sharded and replicated biases.
MODEL_PARALLEL_LAYOUTS = {
    ".*dense_a/kernel": (None, "model"),
    ".*dense_a/bias": ("model",),
    ".*einsum/kernel": ("model", None, None),
    ".*dense_b/kernel": ("model", None),
}


def jax_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", name="dense_a"),
            keras.layers.EinsumDense(
                "ab,bcd->acd", output_shape=(2, 8), bias_axes="d", name="einsum"
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(4, name="dense_b"),
        ]
    )


def distribution_over(kind, devices, batch_groups, auto_shard_dataset=True):
    """`DataParallel` over `devices` (kind "data_parallel"), or
    `ModelParallel` (kind "model_parallel") over a mesh of `batch_groups`
    x (the rest) devices, axes "batch" and "model", with
    `MODEL_PARALLEL_LAYOUTS`."""
    # Passed only where asked for: Keras before 3.9 has no such argument.
    sharding = {} if auto_shard_dataset else {"auto_shard_dataset": False}
    if kind == "data_parallel":
        return keras.distribution.DataParallel(devices=devices, **sharding)
    mesh = keras.distribution.DeviceMesh(
        (batch_groups, len(devices) // batch_groups), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, axes in MODEL_PARALLEL_LAYOUTS.items():
        layout_map[pattern] = axes
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch", **sharding
    )


def free_local_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            bound.bind(("127.0.0.1", 0))
            sockets.append(bound)
        return [bound.getsockname()[1] for bound in sockets]
    finally:
        for bound in sockets:
            bound.close()


def run_processes(commands, environment, logs, timeout_seconds: float) -> None:
    """Starts one process per command (output to its log) and waits for
    them all, at most `timeout_seconds`; ends every one as soon as one
    fails or the time is up. Asserts that each ended with 0, showing the
    tail of the log of the first that did not."""
    processes = []
    try:
        for command, log_path in zip(commands, logs):
            with open(log_path, "w") as log:
                processes.append(
                    subprocess.Popen(
                        command, env=environment, stdout=log, stderr=subprocess.STDOUT
                    )
                )
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            codes = [process.poll() for process in processes]
            if all(code == 0 for code in codes) or any(code for code in codes):
                break
            time.sleep(0.5)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    for index, process in enumerate(processes):
        tail = pathlib.Path(logs[index]).read_text()[-4000:]
        assert process.returncode == 0, (
            f"process {index} ended with {process.returncode} "
            f"(killed after {timeout_seconds} s if negative):\n{tail}"
        )
