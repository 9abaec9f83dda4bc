"""Private: where a step's updates run fused, and the XLA kernel.

"Fused" is one update of all variables of a step without Keras's chain of
per-variable ops, in the form each backend makes fast:

* TensorFlow: each variable's whole update as a single XLA kernel. Keras
  runs `update_step` as a chain of separate ops whenever XLA is off, and
  its default `jit_compile="auto"` turns XLA off on CPU. Every op of the
  chain reads and writes a full-size temporary, so an element-wise update
  costs several times the bytes it has to move. Here the updates of all
  variables of a step (read each variable, its gradient and state; write
  the variable and state) are traced into one
  `tf.function(jit_compile=True)` nested in Keras's train function, which
  XLA compiles into one loop per variable and one launch per step
  (`update_many`).
* PyTorch in eager mode (Keras's default `fit` path on torch): each
  optimizer's update written with in-place and multi-tensor
  (`torch._foreach_*`) torch ops over all variables of the step
  (`keras_soma._torch_step`), a few passes over memory per variable
  instead of one temporary per `keras.ops` call. Under torch.compile
  (`jit_compile=True`) the `keras.ops` update is traced into the compiled
  step and Inductor fuses it itself.

The path exists only where it is known to help and to be safe (`WHERE`):
on TensorFlow inside a traced function (in eager mode a new kernel per
call would be traced every step), outside tf.distribute (distributed
variables are updated per device by the strategy) and with op determinism
off (then Keras keeps XLA off on purpose); on PyTorch always. With
`fused=None` the same math runs op by op everywhere else, and on JAX,
where the whole train step is already compiled by XLA; `fused=True` there
is refused with `refusal` (at build time for what is known then, at
`apply` for eager TensorFlow).
"""

from __future__ import annotations

import keras

WHERE = (
    "on the TensorFlow backend, inside a tf.function (as in `fit` without "
    "`run_eagerly=True`), outside tf.distribute and with op determinism off "
    "(one XLA kernel per step), and on the PyTorch backend (multi-tensor "
    "torch ops in eager mode, as in `fit` without `jit_compile=True`; "
    "under torch.compile, the compiled step)"
)


def path() -> str | None:
    """The fused path of the current context: "xla" (TensorFlow), "torch"
    (PyTorch in eager mode), or None where there is none and under
    torch.compile, which traces the `keras.ops` update into its compiled
    step and fuses it itself (where the multi-tensor update's checks of
    values would split the graph)."""
    if unavailable_reason() is not None:
        return None
    if keras.backend.backend() == "torch":
        return None if torch_compiling() else "torch"
    return "xla"


def torch_compiling() -> bool:
    """Whether torch.compile is tracing the code running now."""
    import torch

    # `torch.compiler.is_compiling` is torch 2.3's; the extra allows 2.1.
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return bool(torch._dynamo.is_compiling())


def unavailable_reason(in_update: bool = True) -> str | None:
    """Why the kernel cannot be used in the current context, or None.

    Args:
        in_update: Whether an update is being run or traced now. Without
            one (at build time) whether it will run inside a tf.function
            is not known yet, and that condition is not checked.
    """
    backend = keras.backend.backend()
    if backend == "torch":
        return None
    if backend != "tensorflow":
        return f"the backend is {backend!r}"
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return "a tf.distribute strategy is in use"
    if _op_determinism_enabled():
        return "op determinism is enabled"
    if in_update and not tf.inside_function():
        return "the update runs eagerly, outside any tf.function"
    return None


def available() -> bool:
    """Whether `update_many` (the XLA kernel) can be used in the current
    context."""
    return path() == "xla"


def refusal(reason: str) -> ValueError:
    """The error for `fused=True` where the fused path does not exist."""
    return ValueError(
        f"Argument `fused` can be True only where a fused update exists: "
        f"{WHERE}. Here {reason}; received: fused=True. Pass `fused=None` "
        "to use it where it exists and run op by op elsewhere."
    )


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
