"""Private: the pieces SM3's update is made of, in `keras.ops`.

Shared by the whole-tensor step (`keras_soma.sm3.sm3_update`) and the
row-blocked one (`keras_soma._sm3_blocked.sm3_update_blocked`), so that
every element goes through the same operations on either path. The numpy
version of the rule is `keras_soma._reference.sm3_step`.
"""

from __future__ import annotations

import math

from keras import ops

# The largest float32. Sums of squares saturate here instead of becoming
# Inf: a gradient element above about 1.8e19 squares past it.
FLOAT32_MAX = 3.4028234663852886e38


def accumulate(previous, squares, beta_2: float):
    """`previous + squares`, or their moving average when `beta_2 < 1`,
    saturated at the largest float32.

    The sum is not written as the `beta_2 = 1` case of the average: that
    would compute `0 * squares`, which is NaN where `squares` overflowed
    to Inf.
    """
    if beta_2 == 1.0:
        total = ops.add(previous, squares)
    else:
        total = ops.add(
            ops.multiply(previous, beta_2), ops.multiply(squares, 1.0 - beta_2)
        )
    return ops.minimum(total, FLOAT32_MAX)


def update_bound(beta_2: float) -> float:
    """The largest |u| the exact arithmetic allows: `nu >= (1 - beta_2) g^2`
    (`nu >= g^2` for sums), so `|u| <= 1 / sqrt(1 - beta_2)` (1 for sums)."""
    return 1.0 if beta_2 == 1.0 else 1.0 / math.sqrt(1.0 - beta_2)


def expand(accumulator, axis: int | None, rank: int):
    """An accumulator reshaped to broadcast against the variable: the
    vector of `axis` as `[1, .., dim, .., 1]`; a full-size one as is."""
    if axis is None or rank <= 1:
        return accumulator
    shape = [1] * rank
    shape[axis] = -1
    return ops.reshape(accumulator, shape)


def reduce_to(values, axis: int | None, rank: int):
    """The maximum of `values` over every axis but `axis` (the value of
    each slice of codimension one), or `values` itself for a full-size
    accumulator."""
    if axis is None:
        return values
    others = tuple(other for other in range(rank) if other != axis)
    if not others:
        return values
    # amax rather than max: the same numbers, but Keras's torch `max`
    # inspects its result in Python, which breaks a torch.compile graph
    # (one SM3 step became 14 graphs); `amax` traces into one.
    return ops.amax(values, axis=others)


def minimum_over_cover(accumulators, axes, rank: int):
    """The smallest accumulator of every element's slices, broadcast to
    the variable's shape (the accumulator itself if full-size)."""
    expanded = [expand(value, axis, rank) for value, axis in zip(accumulators, axes)]
    result = expanded[0]
    for value in expanded[1:]:
        result = ops.minimum(result, value)
    return result


def variant_two_nu(gradient, accumulators, axes, beta_2: float):
    """Variant II's `nu` from a float32 gradient and float32 accumulators."""
    rank = len(gradient.shape)
    return accumulate(
        minimum_over_cover(accumulators, axes, rank),
        ops.multiply(gradient, gradient),
        beta_2,
    )


def preconditioned(gradient, nu, beta_2: float, epsilon: float):
    """`g / sqrt(nu + epsilon)`, 0 where `nu = 0`, within the update bound."""
    # nu = 0 only where g = 0 so far (or g^2 underflowed): no step there.
    update = ops.where(
        ops.greater(nu, 0.0),
        ops.divide(gradient, ops.sqrt(ops.add(nu, epsilon))),
        0.0,
    )
    # A no-op up to rounding, except where nu saturated at FLOAT32_MAX
    # below the true g^2: there it restores the exact step.
    bound = update_bound(beta_2)
    return ops.clip(update, -bound, bound)


def average(momentum_value, update, momentum: float):
    """The new momentum in float32: `momentum * m + (1 - momentum) * update`."""
    return ops.add(
        ops.multiply(ops.cast(momentum_value, "float32"), momentum),
        ops.multiply(update, 1.0 - momentum),
    )


def move(value, update, momentum_value, learning_rate, momentum: float):
    """The momentum (if any) and the variable after a step along `update`.

    Returns `(new_value, new_momentum)`; the momentum is computed in
    float32 and stored in its own dtype, the variable moves in its dtype.
    """
    new_momentum = None
    direction = update
    if momentum_value is not None:
        new_momentum = ops.cast(
            average(momentum_value, update, momentum), momentum_value.dtype
        )
        direction = new_momentum
    step = ops.multiply(learning_rate, ops.cast(direction, value.dtype))
    return ops.subtract(value, step), new_momentum
