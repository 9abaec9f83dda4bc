"""Private helpers shared by every keras_soma optimizer.

One place for: argument checks (so every message has the same shape),
the base-keyword docstring text (inserted once, never copied), the
per-variable state bookkeeping, and the sign with ``sign(0) = 0`` that
ignores NaN.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

try:  # bfloat16 for numpy; installed with TensorFlow, JAX and Keras.
    import ml_dtypes

    _NUMPY_EXTRA_DTYPES = {"bfloat16": ml_dtypes.bfloat16}
except ImportError:  # pragma: no cover - only without ml_dtypes
    _NUMPY_EXTRA_DTYPES = {}


def numpy_dtype(name) -> np.dtype:
    """The numpy dtype for a Keras dtype name (bfloat16 included)."""
    name = str(name)
    if name in _NUMPY_EXTRA_DTYPES:
        return np.dtype(_NUMPY_EXTRA_DTYPES[name])
    return np.dtype(name)


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _describe_interval(low, high, low_inclusive, high_inclusive) -> str:
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    low_text = "-inf" if low is None else f"{low:g}"
    high_text = "inf" if high is None else f"{high:g}"
    return f"{left}{low_text}, {high_text}{right}"


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Returns `value` as a float, or raises a ValueError naming everything.

    The message names the argument, the valid range and the received value,
    e.g. ``Argument `momentum` must be a number in [0, 1); received:
    momentum=1.5``.
    """
    interval = _describe_interval(low, high, low_inclusive, high_inclusive)
    message = (
        f"Argument `{name}` must be a number in {interval}; received: {name}={value!r}"
    )
    if isinstance(value, bool):
        raise ValueError(message)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if math.isnan(number):
        raise ValueError(message)
    if low is not None and (number < low or (number == low and not low_inclusive)):
        raise ValueError(message)
    if high is not None and (number > high or (number == high and not high_inclusive)):
        raise ValueError(message)
    return number


def check_integer(name: str, value: Any, low: int) -> int:
    """Returns `value` (a Python or numpy integer) as an int >= `low`, or
    raises a ValueError."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or value < low
    ):
        raise ValueError(
            f"Argument `{name}` must be an integer >= {low}; received: {name}={value!r}"
        )
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """Returns `value` if it is one of `choices`, or raises a ValueError."""
    if value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(
            f"Argument `{name}` must be one of {allowed}; received: {name}={value!r}"
        )
    return value


def is_variable(value: Any) -> bool:
    """Whether `value` is a variable (Keras's, or a backend's such as
    `tf.Variable`): something assigned to later rather than a number."""
    return isinstance(value, keras.Variable) or callable(getattr(value, "assign", None))


def check_learning_rate(learning_rate: Any) -> Any:
    """Accepts a positive number (returned as a Python float, which Keras
    requires), a LearningRateSchedule or a callable.

    Schedules and callables are checked by Keras when they are called; a
    plain number (int, float or numpy scalar) must be finite and > 0.
    """
    if isinstance(
        learning_rate, keras.optimizers.schedules.LearningRateSchedule
    ) or callable(learning_rate):
        return learning_rate
    if is_variable(learning_rate):
        raise ValueError(
            "Argument `learning_rate` must be a number > 0, a "
            "`keras.optimizers.schedules.LearningRateSchedule` or a callable; "
            f"received a variable ({type(learning_rate).__name__}). The "
            "optimizer keeps its own learning-rate variable: pass a number "
            "and assign `optimizer.learning_rate` to change it."
        )
    return check_number(
        "learning_rate",
        learning_rate,
        low=0.0,
        high=math.inf,
        low_inclusive=False,
        high_inclusive=False,
    )


STATE_DTYPES = ("float32", "bfloat16", "float16")


def check_state_dtype(
    name: str, value: Any, choices: Sequence[str] = STATE_DTYPES
) -> str:
    """Accepts a dtype name for optimizer state (e.g. momentum), one of
    `choices` (by default the floating ones)."""
    try:
        standard = keras.backend.standardize_dtype(value)
    except (ValueError, TypeError, AttributeError):
        standard = value
    return check_choice(name, standard, choices)


# ---------------------------------------------------------------------------
# Docstrings
# ---------------------------------------------------------------------------

BASE_KEYWORD_ARGS = """name: String. The name of the optimizer, and the prefix of the
            state variables it creates. Defaults to the class's name in
            lower case.
        weight_decay: Float >= 0 or `None`. If set, decoupled weight decay
            is applied: `theta <- theta - learning_rate * weight_decay *
            theta` before the update. Defaults to `None`.
        clipnorm: Float >= 0 or `None`. If set, the gradient of each weight
            is individually clipped so that its norm is no higher than
            this value (0: no clipping). Defaults to `None`.
        clipvalue: Float >= 0 or `None`. If set, the gradient of each
            weight is clipped to `[-clipvalue, clipvalue]` (0: no
            clipping). Defaults to `None`.
        global_clipnorm: Float >= 0 or `None`. If set, the gradient of all
            weights is clipped so that their global norm is no higher than
            this value (0: no clipping). Defaults to `None`.
        use_ema: Boolean, defaults to `False`. If `True`, an exponential
            moving average of the model weights is kept by Keras (one more
            copy of the weights, on top of the state listed above).
        ema_momentum: Float, defaults to 0.99. Only used if `use_ema=True`.
        ema_overwrite_frequency: Int or None, defaults to None. Only used if
            `use_ema=True`. Every `ema_overwrite_frequency` steps the model
            weights are overwritten with their moving average.
        loss_scale_factor: Float or `None`. If a float, the loss is
            multiplied by it before gradients are computed and the gradients
            are divided by it before the update. Defaults to `None`.
        gradient_accumulation_steps: Int >= 2 or `None`. If an int, the
            variables move once every that many steps (micro-steps), with
            the mean of their gradients, clipped and decayed once, as in
            Keras; `iterations` counts these windows, while a schedule
            sees every micro-step. Keras keeps a gradient accumulator the
            size of the variables for it; Soma folds the window into its
            moving average instead. With `skip_nonfinite`, a micro-step's
            non-finite gradients count as zeros."""


def insert_base_keyword_args(cls):
    """Class decorator: fills ``{{base_optimizer_keyword_args}}`` and
    ``{{fused_arg}}`` once."""
    if cls.__doc__ is not None:
        cls.__doc__ = cls.__doc__.replace(
            "{{base_optimizer_keyword_args}}", BASE_KEYWORD_ARGS
        ).replace("{{fused_arg}}", FUSED_ARG)
    return cls


# ---------------------------------------------------------------------------
# Math shared by the sign optimizers
# ---------------------------------------------------------------------------


def nan_safe_sign(values, dtype):
    """`sign(values)` as `dtype`, with sign(0) = 0 and sign(NaN) = 0.

    Comparisons with NaN are false, so a NaN element contributes nothing;
    +-Inf give +-1 like any other number of that sign.
    """
    positive = ops.cast(ops.greater(values, 0), dtype)
    negative = ops.cast(ops.less(values, 0), dtype)
    return ops.subtract(positive, negative)


def sign(values):
    """`sign(values)` with sign(0) = 0 and sign(NaN) = NaN on every backend.

    torch's `sign` (eager, and as torch.compile writes it) is 0 for NaN,
    where TensorFlow's, JAX's and numpy's are NaN. On torch the sign is
    therefore written with two selects that pass every other value (0 and
    NaN) through: a loop torch.compile vectorizes, which a NaN test
    (`isnan`, run element by element there) would not be.
    """
    if keras.backend.backend() != "torch":
        return ops.sign(values)
    one = ops.ones((), values.dtype)
    return ops.where(
        ops.greater(values, 0), one, ops.where(ops.less(values, 0), -one, values)
    )


def finite_max(dtype) -> float:
    """The largest finite value of a float dtype (bfloat16 included)."""
    numpy_type = numpy_dtype(keras.backend.standardize_dtype(dtype))
    if "bfloat16" in _NUMPY_EXTRA_DTYPES:
        return float(ml_dtypes.finfo(numpy_type).max)
    return float(np.finfo(numpy_type).max)


def saturating_cast(values, dtype):
    """Casts `values` to `dtype`, saturating: where `dtype`'s range is
    narrower than that of `values` (float64 to float32, float32 to
    bfloat16 or float16), values beyond it, infinities included, become
    its largest finite value with their sign instead of +-Inf. NaN stays
    NaN."""
    target = keras.backend.standardize_dtype(dtype)
    source = keras.backend.standardize_dtype(values.dtype)
    if target != source and finite_max(target) < finite_max(source):
        bound = finite_max(target)
        values = ops.clip(values, -bound, bound)
    return ops.cast(values, target)


def all_finite(tensors: Iterable[Any]):
    """A scalar boolean tensor: True when every element of every tensor is
    finite (gradients given as `None` are ignored)."""
    flags = [ops.all(ops.isfinite(tensor)) for tensor in tensors if tensor is not None]
    if not flags:
        return ops.convert_to_tensor(True)
    result = flags[0]
    for flag in flags[1:]:
        result = ops.logical_and(result, flag)
    return result


def register(cls):
    """Registers a keras_soma class for `.keras` loading and
    `keras.optimizers.get("keras_soma>Name")`, and fills its docstring."""
    cls = insert_base_keyword_args(cls)
    return keras.saving.register_keras_serializable(package="keras_soma")(cls)


def variable_layout(variable) -> Any:
    """The sharding layout a Keras variable was created with (or None).

    Keras keeps it on the variable as ``_layout`` and reads it the same way
    in ``Optimizer.add_variable_from_reference``; there is no public getter.
    """
    return getattr(variable, "_layout", None)


def layout_keyword(constructor, layout: Any) -> dict[str, Any]:
    """`{"layout": layout}` for a `constructor` of variables
    (`keras.Variable`, `Optimizer.add_variable`) that takes a layout, else
    `{}`.

    Keras takes explicit layouts from 3.10 on. Before, there is none to
    give: Keras lays out every new variable itself, from the distribution's
    layout map.
    """
    if "layout" in inspect.signature(constructor).parameters:
        return {"layout": layout}
    return {}


def axis_layout(layout: Any, axis: int) -> Any:
    """The layout of a per-axis state vector of a variable laid out as
    `layout`: the variable's sharding of dimension `axis`, on its mesh.

    Args:
        layout: The variable's layout (see `variable_layout`), or None.
        axis: The dimension of the variable the vector runs along.

    Returns:
        A `keras.distribution.TensorLayout` of rank 1, or None when the
        variable has no layout or a backend-specific one without `axes`
        (the vector is then replicated, which costs little: it holds one
        number per index of that dimension).
    """
    axes = getattr(layout, "axes", None)
    if axes is None:
        return None
    return keras.distribution.TensorLayout(
        axes=(axes[axis],), device_mesh=layout.device_mesh
    )


def state_name(variable, slot: str) -> str:
    """`{variable path}_{slot}`, the naming Keras uses for optimizer state."""
    path = variable_path(variable)
    return f"{path.replace('/', '_').replace(':', '_')}_{slot}"


# ---------------------------------------------------------------------------
# Argument checks: flags
# ---------------------------------------------------------------------------


def to_int(variable) -> int:
    """A scalar variable's (or tensor's) value as a Python int."""
    return int(np.asarray(ops.convert_to_numpy(variable)))


def check_bool(name: str, value: Any) -> bool:
    """Returns `value` if it is True or False, or raises a ValueError."""
    if not isinstance(value, bool):
        raise ValueError(
            f"Argument `{name}` must be a bool (True or False); "
            f"received: {name}={value!r}"
        )
    return value


def check_optional_bool(name: str, value: Any) -> bool | None:
    """Returns `value` if it is None, True or False, or raises a ValueError.

    For tri-state options where None means "where it helps"; 1 or 0.0 are
    refused although they compare equal to True and False.
    """
    if value is not None and not isinstance(value, bool):
        raise ValueError(
            f"Argument `{name}` must be None, True or False; received: {name}={value!r}"
        )
    return value


# The `fused` argument every keras_soma optimizer takes (see `_fused`).
FUSED_ARG = """fused: Bool or `None`. `None` runs each variable's dense update as
            one XLA kernel on TensorFlow inside a tf.function, outside
            tf.distribute and with op determinism off; on PyTorch in eager
            mode (`fit`'s default there) it makes a step's updates with
            in-place and multi-tensor torch ops (under torch.compile the
            compiled step fuses them); elsewhere, and on JAX, op by op.
            `True` raises a ValueError where no fused update exists (at
            build time on JAX, under tf.distribute or with op determinism,
            and on PyTorch for an SM3 its multi-tensor step does not
            take; at `apply` in eager TensorFlow). `False` always runs op
            by op.
            The numbers are the same up to float rounding. Defaults to
            `None`."""


def variable_path(variable) -> str:
    """The variable's path (`layer/kernel`), or its name without one."""
    return getattr(variable, "path", None) or str(variable.name)
