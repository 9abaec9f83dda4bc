"""Private: run one variable's whole update as a single XLA kernel.

Keras runs `update_step` as a chain of separate ops whenever XLA is off,
and its default `jit_compile="auto"` turns XLA off on CPU. Every op of the
chain reads and writes a full-size temporary, so an element-wise update
costs several times the bytes it has to move. Here the updates of all
variables of a step (read each variable, its gradient and state; write the
variable and state) are traced into one `tf.function(jit_compile=True)`
nested in Keras's train function, which XLA compiles into one loop per
variable and one launch per step.

Used only where it is known to help and to be safe: the TensorFlow
backend, inside a traced function (in eager mode a new kernel per call
would be traced every step), outside tf.distribute (distributed variables
are updated per device by the strategy) and with op determinism off (then
Keras keeps XLA off on purpose). Everywhere else, and on JAX where the
whole train step is already compiled by XLA, the same math runs op by op.
"""

from __future__ import annotations

import keras


def available() -> bool:
    """Whether `update` can be used in the current context."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    if not tf.inside_function():
        return False
    if tf.distribute.has_strategy():
        return False
    return not _op_determinism_enabled()


def _op_determinism_enabled() -> bool:
    # TensorFlow exports only the setter; Keras reads the flag the same way.
    try:
        from tensorflow.python.framework.config import is_op_determinism_enabled
    except ImportError:  # pragma: no cover - older or newer TensorFlow
        return False
    return bool(is_op_determinism_enabled())


def update_many(kernels) -> None:
    """Reads, computes and assigns several updates in one XLA function.

    Args:
        kernels: `(targets, compute, gradient, learning_rate)` tuples:
            `targets` are Keras variables to read and then overwrite, in
            order; `compute(values, gradient, learning_rate)` returns their
            new values (already cast to their dtypes); `gradient` is a
            dense tensor and `learning_rate` a scalar tensor.
    """
    import tensorflow as tf

    natives = [
        [
            target.value if isinstance(target, keras.Variable) else target
            for target in targets
        ]
        for targets, _, _, _ in kernels
    ]
    computes = [compute for _, compute, _, _ in kernels]

    def kernel(gradients, learning_rates):
        for variables, compute, gradient, learning_rate in zip(
            natives, computes, gradients, learning_rates
        ):
            values = [variable.read_value() for variable in variables]
            results = compute(values, gradient, learning_rate)
            for variable, result in zip(variables, results):
                variable.assign(result)

    tf.function(kernel, jit_compile=True, autograph=False)(
        [gradient for _, _, gradient, _ in kernels],
        [learning_rate for _, _, _, learning_rate in kernels],
    )
