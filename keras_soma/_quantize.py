"""Private: blockwise int8 quantization of optimizer state (keras.ops only).

The format, as data:

* values: int8 codes in [-127, 127], the tensor's own shape;
* blocks: `block_size` consecutive elements of the tensor flattened in
  row-major order; the last block is partial when the size is not a
  multiple of `block_size` (a tensor smaller than one block is one block);
* scales: one float32 per block, `ceil(size / block_size)` of them, the
  block's largest absolute value (1 for a block of zeros, so a scale is
  never 0, NaN or Inf);
* value of a code (the "sqrt" code, the format Soma stores):
  `sign(code) * (code / 127) ** 2 * scale`, so the smallest nonzero
  magnitude is `scale / 16129` rather than the linear code's
  `scale / 127`; the linear code (`code / 127 * scale`) is kept for
  comparison (benchmarks/int8_rounding.py).

Quantizing rounds `127 * sign(x) * sqrt(|x| / scale)` (linear code:
`127 * x / scale`) to the nearest integer (ties to even, as numpy,
TensorFlow, JAX and torch round), or, given uniform random numbers `u`
in [0, 1), stochastically: `floor(x + u)`. Before
that, NaN becomes 0 and values beyond float32's range saturate to its
largest finite value, so that one non-finite element cannot make the
scale of its whole block NaN or Inf.

`keras_soma._reference` holds the same math in numpy.
"""

from __future__ import annotations

import math

import keras
from keras import ops

CODE_MAX = 127
FLOAT32_MAX = 3.4028234663852886e38


def block_count(size: int, block_size: int) -> int:
    """How many blocks a tensor of `size` elements has (at least one)."""
    return max(1, math.ceil(size / block_size))


def element_count(shape) -> int:
    """How many elements a tensor of `shape` has."""
    return int(math.prod(int(size) for size in shape))


def row_groups(shape, block_size: int) -> tuple[int, int]:
    """`(rows, blocks)` of the smallest run of whole rows of a tensor of
    `shape` (rows along the first dimension) that is also a run of whole
    blocks: `lcm(row size, block_size)` elements. The blocks of a group
    hold no element of another group's rows, so a group's blocks can be
    requantized on their own (the last group may be partial, as the last
    block may be)."""
    row_size = element_count(shape[1:])
    group_size = math.lcm(row_size, block_size)
    return group_size // row_size, group_size // block_size


def _blocked(values, block_size: int, padding_value=0):
    """`values` flattened and padded to `[blocks, block_size]`."""
    size = element_count(values.shape)
    blocks = block_count(size, block_size)
    flat = ops.reshape(values, (size,))
    padding = blocks * block_size - size
    if padding:
        flat = ops.concatenate(
            [flat, ops.full((padding,), padding_value, dtype=flat.dtype)]
        )
    return ops.reshape(flat, (blocks, block_size))


def _unblocked(blocked, shape):
    """The first `prod(shape)` elements of `blocked`, in `shape`."""
    size = element_count(shape)
    flat = ops.reshape(blocked, (-1,))
    if flat.shape[0] != size:
        flat = flat[:size]
    return ops.reshape(flat, shape)


CODES = ("linear", "sqrt")


def quantize_blockwise(values, block_size: int, uniform=None, code: str = "sqrt"):
    """Quantizes float `values` to int8 codes and float32 block scales.

    Args:
        values: A float tensor of any shape (computed in float32).
        block_size: Elements per block, an int >= 1.
        uniform: None for round-to-nearest, or a float32 tensor of shape
            `[blocks, block_size]` of uniform numbers in [0, 1) for
            stochastic rounding.
        code: `"sqrt"`, a companded code with finer steps near 0
            (`value = sign(code) * (code / 127) ** 2 * scale`: the code is
            rounded from `127 * sign(x) * sqrt(|x| / scale)`), or
            `"linear"` (`value = code / 127 * scale`). Defaults to
            `"sqrt"`.

    Returns:
        `(codes, scales)`: int8 codes of the shape of `values` and float32
        scales of shape `[block_count(size, block_size)]`.
    """
    blocked = _blocked(finite_float32(values), block_size)
    codes, scales = quantize_blocks(blocked, uniform, code)
    return _unblocked(codes, tuple(values.shape)), scales


def quantize_blocks(blocked, uniform=None, code: str = "sqrt"):
    """`quantize_blockwise` of values already in blocks: `blocked` is
    float32, `[blocks, block_size]` and finite (its first dimension may
    be unknown while tracing). Returns `(codes, scales)`, the codes in
    the blocks' shape."""
    absmax = block_absmax(blocked)
    scales = ops.where(ops.greater(absmax, 0.0), absmax, ops.ones_like(absmax))
    return encode_blocks(blocked, scales, uniform, code), scales


# How many times `block_absmax` folds the rows before XLA's reduction: 2
# or 3 made TensorFlow's int8 Soma step about 1.7 times faster than one
# plain reduction, 4 did not (XLA's fusion changes), at block sizes 256
# and 64 (`python benchmarks/int8_step_parts.py --halvings 0 2 3 4`, and
# with `--block-size 64`; the Performance page has the tables); 3 leaves
# the smaller temporary (tests/registry.py, the int8 rows).
ABSMAX_HALVINGS = 3


def block_absmax(blocked):
    """The largest magnitude of each row of `blocked` (`[blocks,
    block_size]`, no NaN).

    On the XLA backends (TensorFlow, JAX) each row is first folded onto
    itself `ABSMAX_HALVINGS` times (the element-wise maximum of its two
    halves; folding stops at an odd width), which XLA fuses into one loop
    with the values' producer, and only what remains (an eighth, for a
    block size divisible by 8) is left to a reduction: XLA on CPU does
    not fuse a reduction with its producer (it writes `|values|` out
    whole first) and runs a row reduction nearly element by element. A
    maximum is exact in any order, so the result is the same.
    """
    magnitudes = ops.abs(blocked)
    if keras.backend.backend() in ("tensorflow", "jax"):
        for _ in range(ABSMAX_HALVINGS):
            if magnitudes.shape[1] % 2:
                break
            half = magnitudes.shape[1] // 2
            magnitudes = ops.maximum(magnitudes[:, :half], magnitudes[:, half:])
    return ops.max(magnitudes, axis=1)


def quantize_with_scales(values, scales, block_size: int, code: str = "sqrt"):
    """int8 codes of `values` with the given block `scales` rather than
    each block's largest magnitude (nearest rounding; an element beyond
    its block's scale saturates at +-127). Not a format of its own: what
    `quantize_blockwise` does after its block maximum, for
    `benchmarks/int8_step_parts.py`, which times the two apart."""
    blocked = _blocked(finite_float32(values), block_size)
    return _unblocked(encode_blocks(blocked, scales, None, code), tuple(values.shape))


def finite_float32(values):
    """`values` in float32 with NaN as 0 and +-Inf as +-float32's largest."""
    values = ops.cast(values, "float32")
    values = ops.where(ops.isnan(values), ops.zeros_like(values), values)
    return ops.clip(values, -FLOAT32_MAX, FLOAT32_MAX)


def encode_blocks(blocked, scales, uniform=None, code: str = "sqrt"):
    """int8 codes of `blocked` (float32, `[blocks, block_size]`, finite)
    with the block `scales` (float32, `[blocks]`, never 0; an element
    beyond its block's scale saturates at +-127)."""
    # value / scale lies in [-1, 1] (the block's largest element gives
    # exactly +-1), so neither the division nor the product can overflow.
    # XLA may divide by multiplying with the reciprocal, which flushes to 0
    # for scales beyond 2**126; such blocks are divided with both sides
    # scaled by 2**-64 first (exact: powers of two), the others as they are.
    rescale = ops.where(
        ops.greater(scales, 2.0**100), ops.full_like(scales, 2.0**-64), 1.0
    )
    scaled = ops.divide(
        ops.multiply(blocked, ops.expand_dims(rescale, 1)),
        ops.expand_dims(ops.multiply(scales, rescale), 1),
    )
    if code == "sqrt":
        scaled = ops.multiply(ops.sign(scaled), ops.sqrt(ops.abs(scaled)))
    scaled = ops.multiply(scaled, CODE_MAX)
    if uniform is None:
        codes = ops.round(scaled)
    else:
        codes = ops.floor(ops.add(scaled, uniform))
    codes = ops.cast(ops.clip(codes, -CODE_MAX, CODE_MAX), "int8")
    return codes


def dequantize_blockwise(codes, scales, block_size: int, code: str = "sqrt"):
    """The float32 values of int8 `codes` with their block `scales`."""
    shape = tuple(codes.shape)
    blocked = _blocked(ops.cast(codes, "int8"), block_size)
    return _unblocked(dequantize_blocks(blocked, scales, code), shape)


def dequantize_blocks(codes, scales, code: str = "sqrt"):
    """`dequantize_blockwise` of codes already in blocks (`[blocks,
    block_size]`, the first dimension possibly unknown while tracing)."""
    fractions = ops.divide(ops.cast(codes, "float32"), float(CODE_MAX))
    if code == "sqrt":
        fractions = ops.multiply(fractions, ops.abs(fractions))
    return ops.multiply(fractions, ops.expand_dims(ops.cast(scales, "float32"), 1))


def on_int8_rows(step_fn, row_slot_count: int, block_size: int):
    """`step_fn`, a step on some rows of a variable, on a momentum stored
    as blockwise int8, touching only the blocks of those rows.

    `step_fn(value, gradient, *row_slots, momentum, learning_rate,
    *hyperparameters)` takes the rows stepped (`row_slot_count` other
    slots' rows, and the momentum's rows in float32) and returns
    `(new_value, *new_row_slots, new_momentum)`. The returned function
    takes `(value, gradient, *row_slots, codes, scales, learning_rate,
    positions, *hyperparameters)`: `codes` and `scales` are the whole
    groups of rows and blocks that hold the rows stepped (`row_groups`;
    rows beyond the variable read as zeros), `positions` where each row
    stepped lies in `codes`. It dequantizes the groups, lets `step_fn`
    step the rows, and requantizes each block that holds an element of
    them with its new largest magnitude (other rows in such a block keep
    their momentum up to that rounding); the other blocks keep their
    codes and scales. It returns `(new_value, *new_row_slots, codes,
    scales)`.
    """

    def step(value, gradient, *arguments):
        row_slots = arguments[:row_slot_count]
        codes, scales, learning_rate, positions, *hyperparameters = arguments[
            row_slot_count:
        ]
        # The groups hold whole blocks, so their codes fold into blocks as
        # they are (the number of groups is unknown while TensorFlow
        # traces).
        blocked_codes = ops.reshape(codes, (-1, block_size))
        average = ops.reshape(
            dequantize_blocks(blocked_codes, scales), ops.shape(codes)
        )
        new_value, *new_row_slots, rows_average = step_fn(
            value,
            gradient,
            *row_slots,
            ops.take(average, positions, axis=0),
            learning_rate,
            *hyperparameters,
        )
        rows_average = ops.cast(rows_average, "float32")
        at_rows = ops.expand_dims(positions, 1)
        average = ops.scatter_update(average, at_rows, rows_average)
        new_codes, new_scales = quantize_blocks(
            finite_float32(ops.reshape(average, (-1, block_size)))
        )
        stepped = ops.scatter_update(
            ops.zeros_like(average), at_rows, ops.ones_like(rows_average)
        )
        requantized = ops.greater(ops.max(ops.reshape(stepped, (-1, block_size)), 1), 0)
        new_codes = ops.where(ops.expand_dims(requantized, 1), new_codes, blocked_codes)
        return (
            new_value,
            *new_row_slots,
            ops.reshape(new_codes, ops.shape(codes)),
            ops.where(requantized, new_scales, scales),
        )

    return step
