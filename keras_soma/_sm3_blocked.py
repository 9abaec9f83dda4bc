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

from keras_soma import _sm3_math

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


def rows_per_block(
    shape: Sequence[int], blocked: bool | None, fused_kernel: bool
) -> int | None:
    """Rows per block where a dense variant II update of a variable of
    `shape` runs block by block, else None.

    That path is taken on CPU where XLA compiles the update: the fused
    kernel on TensorFlow (`fused_kernel`: whether it is in use), and JAX
    without a Keras distribution (a loop over blocks of a sharded variable
    would need the sharding's cooperation). On GPU and TPU, where XLA
    fuses reductions itself and a loop of small kernels would be slow, it
    is taken only with `blocked=True`; `blocked=False` never takes it.
    """
    if blocked is False:
        return None
    rows = block_rows(tuple(shape))
    if rows is None:
        return None
    backend = keras.backend.backend()
    if backend == "tensorflow":
        if not fused_kernel:
            return None
        import tensorflow as tf

        accelerator = bool(
            tf.config.list_logical_devices("GPU")
            or tf.config.list_logical_devices("TPU")
        )
    elif backend == "jax":
        import jax

        if keras.distribution.distribution() is not None:
            return None
        accelerator = jax.default_backend() != "cpu"
    else:
        return None
    if accelerator and blocked is not True:
        return None
    return rows


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
