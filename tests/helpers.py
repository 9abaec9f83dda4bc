"""Test helpers: stepping an optimizer eagerly or compiled on any
backend, random gradients, and comparisons with the numpy reference."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

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
        import jax

        optimizer.build(variables)

        @jax.jit
        def compiled(optimizer_values, variable_values, gradients):
            traces.append(1)
            return optimizer.stateless_apply(
                optimizer_values, gradients, variable_values
            )

        def step(gradients):
            new_variables, new_optimizer = compiled(
                [v.value for v in optimizer.variables],
                [v.value for v in variables],
                [keras.ops.convert_to_tensor(g) for g in gradients],
            )
            for target, value in zip(variables, new_variables):
                target.assign(value)
            for target, value in zip(optimizer.variables, new_optimizer):
                target.assign(value)

        step.trace_count = lambda: len(traces)
        return step
    if backend == "torch":
        return _torch_compiled_stepper(optimizer, variables)
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
    return spec.cls(**kwargs)


def to_numpy(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


def assert_state_close(
    optimizer, variable, reference_state: dict, dtype: str, context=""
):
    slots = optimizer.get_slots(variable)
    assert sorted(slots) == sorted(reference_state), (
        f"slot names {sorted(slots)} != reference {sorted(reference_state)}"
    )
    for name, expected in reference_state.items():
        actual = to_numpy(slots[name])
        assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        tolerance = TOLERANCE.get(str(expected.dtype), 0)
        np.testing.assert_allclose(
            actual.astype(np.float64),
            expected.astype(np.float64),
            rtol=tolerance,
            atol=tolerance,
            err_msg=f"slot {name!r} {context}",
        )
