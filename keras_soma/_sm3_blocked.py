"""Private: SM3's variant II update computed block of rows by block of rows.

An implementation strategy, not another rule: the numbers are those of
`keras_soma.sm3.sm3_update` to float32 rounding. Variant II's `nu` feeds
three things: the element-wise update and two or more maxima along
different axes. XLA on CPU fuses none of the reductions with the
element-wise pass, so over whole tensors it keeps `nu` as a temporary of
the variable's size. Here the element-wise update (which needs only the
old accumulators) is one pass over whole tensors that recomputes `nu` as
it goes, and the new accumulators come from a loop over blocks of rows:
each block's `nu` is small and stays in cache while its row maxima (final)
and its maxima along the other axes (a running maximum over the blocks)
are taken. A step's temporaries are those of a block. See "Memory of a
step" on the SM3 page of the docs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import ops

from keras_soma import _fused, _sm3_math

# About this many elements per block, so that a block of the gradient and
# its temporaries stay in a core's cache, and only for variables of at
# least this many elements (smaller ones gain nothing).
BLOCK_ELEMENTS = 2**15
MIN_BLOCKED_ELEMENTS = 2**18


def block_rows(shape: Sequence[int]) -> int | None:
    """Rows per block of the row-blocked path for a variable of `shape`,
    or None where that path does not apply (rank < 2, or too small)."""
    if len(shape) < 2 or any(dimension is None for dimension in shape):
        return None
    row_elements = math.prod(shape[1:])
    if row_elements * shape[0] < MIN_BLOCKED_ELEMENTS:
        return None
    rows = max(1, BLOCK_ELEMENTS // max(row_elements, 1))
    if rows * 2 > shape[0]:
        return None
    return rows


# Where the path exists, for messages refusing `blocked=True` elsewhere.
WHERE = (
    "variant 'II', on TensorFlow where the fused kernel runs (`fused` None "
    "or True, inside a tf.function, outside tf.distribute, op determinism "
    "off) and on JAX without a Keras distribution"
)


def unavailable_reason(
    variant: str, fused: bool | None, in_update: bool = True
) -> str | None:
    """Why the row-blocked path cannot run in the current context, or None.

    Args:
        variant: The optimizer's variant.
        fused: The optimizer's `fused` argument.
        in_update: As for `_fused.unavailable_reason`: False at build time.
    """
    if variant != "II":
        return f"variant={variant!r}"
    backend = keras.backend.backend()
    if backend == "tensorflow":
        if fused is False:
            return "fused=False runs the update op by op"
        reason = _fused.unavailable_reason(in_update)
        return None if reason is None else f"{reason} (no fused kernel)"
    if backend == "jax":
        if keras.distribution.distribution() is not None:
            return "a Keras distribution is set"
        return None
    return f"the backend is {backend!r}"


def refusal(reason: str) -> ValueError:
    """The error for `blocked=True` where the path does not exist."""
    return ValueError(
        "Argument `blocked` can be True only where the row-blocked update "
        f"exists: {WHERE}. Here {reason}; received: blocked=True. Pass "
        "`blocked=None` to use it where it helps (on CPU) and the "
        "whole-tensor update elsewhere."
    )


def rows_per_block(
    shape: Sequence[int], variant: str, blocked: bool | None, fused: bool | None
) -> int | None:
    """Rows per block where a dense update of a variable of `shape` runs
    block by block, else None.

    The path exists where XLA compiles the update (`WHERE`; a loop over
    blocks of a variable sharded by a Keras distribution would need the
    sharding's cooperation). `blocked=None` takes it there on CPU only:
    on GPU and TPU XLA fuses reductions itself and a loop of small kernels
    would be slow. `blocked=True` takes it there on any device and raises
    a ValueError where it does not exist; `blocked=False` never takes it.
    Variables of rank < 2 or of fewer than `MIN_BLOCKED_ELEMENTS` elements
    always take the whole-tensor update.
    """
    if blocked is False:
        return None
    reason = unavailable_reason(variant, fused)
    if reason is not None:
        if blocked:
            raise refusal(reason)
        return None
    rows = block_rows(tuple(shape))
    if rows is None or blocked:
        return rows
    return None if _on_accelerator() else rows


def _on_accelerator() -> bool:
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return bool(
            tf.config.list_logical_devices("GPU")
            or tf.config.list_logical_devices("TPU")
        )
    import jax

    return jax.default_backend() != "cpu"


def sm3_update_blocked(
    value,
    gradient,
    accumulators: Sequence,
    momentum_value,
    learning_rate,
    rows_per_block: int,
    momentum: float,
    beta_2: float,
    epsilon: float,
):
    """`sm3_update` for variant II and a dense gradient of rank >= 2, with
    the new accumulators computed `rows_per_block` rows at a time.

    Every element's `nu` and update go through the same operations as in
    `sm3_update`, and max is exact, so the results agree with it to
    float32 rounding (XLA may contract `A + g * g` into one fused
    multiply-add in one form and not the other).

    Returns `(new_value, new_accumulators, new_momentum)` as `sm3_update`.
    """
    shape = tuple(value.shape)
    rank = len(shape)
    axes = list(range(rank))
    gradient = ops.cast(gradient, "float32")
    accumulators = [ops.cast(accumulator, "float32") for accumulator in accumulators]
    full_blocks, remainder = divmod(shape[0], rows_per_block)

    def accumulate_block(start, rows, carry):
        first_axis, other_axes = carry
        block = ops.slice(gradient, [start] + [0] * (rank - 1), [rows, *shape[1:]])
        block_accumulators = [
            ops.slice(accumulators[0], [start], [rows]),
            *accumulators[1:],
        ]
        nu = _sm3_math.variant_two_nu(block, block_accumulators, axes, beta_2)
        first_axis = ops.slice_update(
            first_axis, [start], _sm3_math.reduce_to(nu, 0, rank)
        )
        # nu >= 0, so 0 is the identity of the running maximum.
        other_axes = [
            ops.maximum(running, _sm3_math.reduce_to(nu, axis, rank))
            for running, axis in zip(other_axes, axes[1:])
        ]
        return first_axis, other_axes

    carry = (
        ops.zeros((shape[0],), "float32"),
        [ops.zeros((dimension,), "float32") for dimension in shape[1:]],
    )
    carry = ops.fori_loop(
        0,
        full_blocks,
        lambda index, loop_carry: accumulate_block(
            index * rows_per_block, rows_per_block, loop_carry
        ),
        carry,
    )
    if remainder:
        carry = accumulate_block(full_blocks * rows_per_block, remainder, carry)
    first_axis, other_axes = carry

    nu = _sm3_math.variant_two_nu(gradient, accumulators, axes, beta_2)
    update = _sm3_math.preconditioned(gradient, nu, beta_2, epsilon)
    new_value, new_momentum = _sm3_math.move(
        value, update, momentum_value, learning_rate, momentum
    )
    return new_value, [first_axis, *other_axes], new_momentum
