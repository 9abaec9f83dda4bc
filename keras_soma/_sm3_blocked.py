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

from keras_soma import _fused, _quantize, _sm3_math

# About this many elements per block, so that a block of the gradient and
# its temporaries stay in a core's cache, and only for variables of at
# least this many elements (smaller ones gain nothing).
BLOCK_ELEMENTS = 2**15
MIN_BLOCKED_ELEMENTS = 2**18
# By default (`blocked=None`) only variables that hold at least this share
# of the parameters the optimizer was built for take the loop. Each loop
# costs compile memory once; a smaller variable's whole-tensor temporary
# is a small part of the step's peak. On the memory page's 81M-parameter
# transformer on TensorFlow, blocking all 37 variables the path applies
# to left 513 MB resident after the first step beyond SGD's and the
# state, blocking none 324 MB; but blocking none keeps the token
# embedding's whole-tensor temporary (221 MiB at 154M parameters). At
# 1/16 only that embedding is blocked there.
MIN_BLOCKED_SHARE = 1 / 16


def block_rows(shape: Sequence[int], multiple: int = 1) -> int | None:
    """Rows per block of the row-blocked path for a variable of `shape`,
    a multiple of `multiple`, or None where that path does not apply
    (rank < 2, too small, or fewer than two blocks of rows).

    A blockwise int8 momentum passes the rows of its smallest run of
    whole quantization blocks (`_quantize.row_groups`) as `multiple`, so
    that each block of rows requantizes whole blocks of its own."""
    if len(shape) < 2 or any(dimension is None for dimension in shape):
        return None
    row_elements = math.prod(shape[1:])
    if row_elements * shape[0] < MIN_BLOCKED_ELEMENTS:
        return None
    rows = max(1, BLOCK_ELEMENTS // max(row_elements, 1))
    rows = max(multiple, rows - rows % multiple)
    if rows * 2 > shape[0]:
        return None
    return rows


# Where the path exists, for messages refusing `blocked=True` elsewhere.
WHERE = (
    "variant 'II', on TensorFlow where the fused kernel runs (`fused` None "
    "or True, inside a tf.function, outside tf.distribute, op determinism "
    "off) and on JAX without a Keras distribution"
)


def total_elements(variables) -> int | None:
    """The elements of `variables` together, or None if a shape is not
    fully known (then `rows_per_block` applies no share rule)."""
    shapes = [tuple(variable.shape) for variable in variables]
    if any(dimension is None for shape in shapes for dimension in shape):
        return None
    return sum(math.prod(shape) for shape in shapes)


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
    shape: Sequence[int],
    variant: str,
    blocked: bool | None,
    fused: bool | None,
    multiple: int = 1,
    total_elements: int | None = None,
) -> int | None:
    """Rows per block where a dense update of a variable of `shape` runs
    block by block, else None; a multiple of `multiple` (`block_rows`).

    The path exists where XLA compiles the update (`WHERE`; a loop over
    blocks of a variable sharded by a Keras distribution would need the
    sharding's cooperation). `blocked=None` takes it there on CPU only
    (on GPU and TPU XLA fuses reductions itself and a loop of small
    kernels would be slow), and only for a variable of at least
    `MIN_BLOCKED_SHARE` of `total_elements`, the elements of the variables
    the optimizer was built for, where known (each loop costs compile
    memory once, which a small variable's temporary does not repay).
    `blocked=True` takes it there on any device for every variable and
    raises a ValueError where it does not exist; `blocked=False` never
    takes it. Variables of rank < 2, of fewer than `MIN_BLOCKED_ELEMENTS` elements,
    or with fewer than two runs of `multiple` rows always take the
    whole-tensor update.
    """
    if blocked is False:
        return None
    reason = unavailable_reason(variant, fused)
    if reason is not None:
        if blocked:
            raise refusal(reason)
        return None
    rows = block_rows(tuple(shape), multiple)
    if rows is None or blocked:
        return rows
    if total_elements and math.prod(shape) < MIN_BLOCKED_SHARE * total_elements:
        return None
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
    momentum_scales=None,
    block_size: int | None = None,
):
    """`sm3_update` for variant II and a dense gradient of rank >= 2, with
    the new accumulators computed `rows_per_block` rows at a time.

    Every element's `nu` and update go through the same operations as in
    `sm3_update`, and max is exact, so the results agree with it to
    float32 rounding (XLA may contract `A + g * g` into one fused
    multiply-add in one form and not the other).

    With `block_size`, `momentum_value` holds the int8 codes of a
    blockwise momentum and `momentum_scales` their block scales
    (`keras_soma._quantize`), and `rows_per_block` must be a multiple of
    the rows of a run of whole blocks (`block_rows`). The new momentum is
    then averaged and requantized block of rows by block of rows in the
    same loop, so that no float32 momentum of the variable's size is
    made; the variable moves along the float32 average, as in the
    whole-tensor step.

    Returns `(new_value, new_accumulators, new_momentum)` as `sm3_update`;
    with `block_size`, `new_momentum` is `[codes, scales]`.
    """
    shape = tuple(value.shape)
    rank = len(shape)
    axes = list(range(rank))
    gradient = ops.cast(gradient, "float32")
    accumulators = [ops.cast(accumulator, "float32") for accumulator in accumulators]
    full_blocks, remainder = divmod(shape[0], rows_per_block)
    quantized = block_size is not None
    if quantized:
        codes = momentum_value
        momentum_value = _quantize.dequantize_blockwise(
            codes, momentum_scales, block_size
        )
        # Scales per block of rows: whole quantization blocks (checked).
        scales_per_block, partial = divmod(
            rows_per_block * math.prod(shape[1:]), block_size
        )
        if partial:
            raise ValueError(
                f"rows_per_block={rows_per_block} rows of {shape[1:]} are not "
                f"whole blocks of block_size={block_size}"
            )

    def step_block(start, rows, carry, scales_start=None, scale_count=None):
        first_axis, other_axes, *momentum_carry = carry
        corner = [start] + [0] * (rank - 1)
        block = ops.slice(gradient, corner, [rows, *shape[1:]])
        # A block's rows of the carry still hold their old accumulator.
        block_accumulators = [
            ops.slice(first_axis, [start], [rows]),
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
        if not quantized:
            return first_axis, other_axes
        # As the accumulator: the block's codes and scales are still old.
        new_codes, new_scales = momentum_carry
        old = _quantize.dequantize_blockwise(
            ops.slice(new_codes, corner, [rows, *shape[1:]]),
            ops.slice(new_scales, [scales_start], [scale_count]),
            block_size,
        )
        update = _sm3_math.preconditioned(block, nu, beta_2, epsilon)
        block_codes, block_scales = _quantize.quantize_blockwise(
            _sm3_math.average(old, update, momentum), block_size
        )
        new_codes = ops.slice_update(new_codes, corner, block_codes)
        new_scales = ops.slice_update(new_scales, [scales_start], block_scales)
        return first_axis, other_axes, new_codes, new_scales

    # The element-wise pass first: it reads the old accumulators (and the
    # old momentum), which the loop below then overwrites in place. A zero
    # computed from one element of its result starts the running maxima,
    # so that XLA must finish the pass before the loop and needs no copy
    # of what the loop overwrites.
    nu = _sm3_math.variant_two_nu(gradient, accumulators, axes, beta_2)
    update = _sm3_math.preconditioned(gradient, nu, beta_2, epsilon)
    new_value, new_momentum = _sm3_math.move(
        value, update, momentum_value, learning_rate, momentum
    )
    after_the_pass = ops.multiply(
        ops.cast(ops.isnan(ops.reshape(new_value, (-1,))[0]), "float32"), 0.0
    )

    # The first axis's accumulator is overwritten block by block (every
    # row is in one block); the running maxima start from 0, their
    # identity (nu >= 0).
    carry = (
        accumulators[0],
        [
            ops.add(ops.zeros((dimension,), "float32"), after_the_pass)
            for dimension in shape[1:]
        ],
    )
    if quantized:
        carry = (*carry, codes, momentum_scales)

    def loop_step(index, loop_carry):
        scales_start = index * scales_per_block if quantized else None
        return step_block(
            index * rows_per_block,
            rows_per_block,
            loop_carry,
            scales_start,
            scales_per_block if quantized else None,
        )

    carry = ops.fori_loop(0, full_blocks, loop_step, carry)
    if remainder:
        scales_start = full_blocks * scales_per_block if quantized else None
        carry = step_block(
            full_blocks * rows_per_block,
            remainder,
            carry,
            scales_start,
            momentum_scales.shape[0] - scales_start if quantized else None,
        )
    first_axis, other_axes, *momentum_carry = carry
    if quantized:
        new_momentum = momentum_carry
    return new_value, [first_axis, *other_axes], new_momentum
