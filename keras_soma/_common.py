"""Private helpers shared by every keras_soma optimizer.

One place for: argument checks (so every message has the same shape),
the base-keyword docstring text (inserted once, never copied), the
per-variable state bookkeeping, and the sign with ``sign(0) = 0`` that
ignores NaN.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from typing import Any

import keras
from keras import ops

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
    """Returns `value` as an int >= `low`, or raises a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"Argument `{name}` must be an integer >= {low}; received: {name}={value!r}"
        )
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """Returns `value` if it is one of `choices`, or raises a ValueError."""
    if value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(
            f"Argument `{name}` must be one of {allowed}; received: {name}={value!r}"
        )
    return value


def check_learning_rate(learning_rate: Any) -> Any:
    """Accepts a positive float, a LearningRateSchedule or a callable.

    Schedules and callables are checked by Keras when they are called; a
    plain number must be finite and > 0.
    """
    if isinstance(
        learning_rate, keras.optimizers.schedules.LearningRateSchedule
    ) or callable(learning_rate):
        return learning_rate
    if isinstance(learning_rate, keras.Variable):
        return learning_rate
    check_number(
        "learning_rate",
        learning_rate,
        low=0.0,
        high=math.inf,
        low_inclusive=False,
        high_inclusive=False,
    )
    return learning_rate


STATE_DTYPES = ("float32", "bfloat16", "float16")


def check_state_dtype(name: str, value: Any) -> str:
    """Accepts a floating dtype name for optimizer state (e.g. momentum)."""
    try:
        standard = keras.backend.standardize_dtype(value)
    except (ValueError, TypeError, AttributeError):
        standard = value
    return check_choice(name, standard, STATE_DTYPES)


# ---------------------------------------------------------------------------
# Docstrings
# ---------------------------------------------------------------------------

BASE_KEYWORD_ARGS = """name: String. The name to use for momentum accumulator
            weights created by the optimizer.
        weight_decay: Float. If set, decoupled weight decay is applied:
            `theta <- theta - learning_rate * weight_decay * theta` before
            the update.
        clipnorm: Float. If set, the gradient of each weight is
            individually clipped so that its norm is no higher than this
            value.
        clipvalue: Float. If set, the gradient of each weight is clipped
            to be no higher than this value.
        global_clipnorm: Float. If set, the gradient of all weights is
            clipped so that their global norm is no higher than this value.
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
        gradient_accumulation_steps: Int or `None`. If an int, gradients
            are accumulated for this many steps and the update (and the
            optimizer state) moves once every that many steps, with the
            mean of the accumulated gradients."""


def insert_base_keyword_args(cls):
    """Class decorator: fills ``{{base_optimizer_keyword_args}}`` once."""
    if cls.__doc__ is not None:
        cls.__doc__ = cls.__doc__.replace(
            "{{base_optimizer_keyword_args}}", BASE_KEYWORD_ARGS
        )
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


# Largest finite float16; float32 and bfloat16 share float32's range.
FLOAT16_MAX = 65504.0


def saturating_cast(values, dtype):
    """Casts float32 `values` to `dtype`; for float16, finite values
    beyond its range become +-65504 instead of +-Inf."""
    if keras.backend.standardize_dtype(dtype) == "float16":
        values = ops.clip(values, -FLOAT16_MAX, FLOAT16_MAX)
    return ops.cast(values, dtype)


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
    path = getattr(variable, "path", None) or str(variable.name)
    return f"{path.replace('/', '_').replace(':', '_')}_{slot}"
