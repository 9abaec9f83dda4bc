"""Private: run one variable's whole update as a single XLA kernel.

Keras runs `update_step` as a chain of separate ops whenever XLA is off,
and its default `jit_compile="auto"` turns XLA off on CPU. Every op of the
chain reads and writes a full-size temporary, so an element-wise update
costs several times the bytes it has to move. Here the update of one
variable (read the variable, its gradient and state; write the variable
and state) is traced into a `tf.function(jit_compile=True)` nested in
Keras's train function, which XLA compiles into one loop.

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
    if _op_determinism_enabled():
        return False
    return True


def _op_determinism_enabled() -> bool:
    # TensorFlow exports only the setter; Keras reads the flag the same way.
    try:
        from tensorflow.python.framework.config import is_op_determinism_enabled
    except ImportError:  # pragma: no cover - older or newer TensorFlow
        return False
    return bool(is_op_determinism_enabled())


def update(targets, compute, gradient, learning_rate) -> None:
    """Reads `targets`, runs `compute` and assigns the results, in one
    XLA-compiled function.

    Args:
        targets: Keras variables to read and then overwrite, in order.
        compute: `compute(values, gradient, learning_rate)` returning the
            new values of `targets` (already cast to their dtypes).
        gradient: dense gradient tensor.
        learning_rate: scalar tensor.
    """
    import tensorflow as tf

    natives = [
        target.value if isinstance(target, keras.Variable) else target
        for target in targets
    ]

    def kernel(gradient, learning_rate):
        values = [native.read_value() for native in natives]
        results = compute(values, gradient, learning_rate)
        for native, result in zip(natives, results):
            native.assign(result)

    tf.function(kernel, jit_compile=True, autograph=False)(
        gradient, learning_rate
    )
