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

from keras import ops

CODE_MAX = 127
FLOAT32_MAX = 3.4028234663852886e38


def block_count(size: int, block_size: int) -> int:
    """How many blocks a tensor of `size` elements has (at least one)."""
    return max(1, math.ceil(size / block_size))


def element_count(shape) -> int:
    """How many elements a tensor of `shape` has."""
    return int(math.prod(int(size) for size in shape))


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
    shape = tuple(values.shape)
    values = ops.cast(values, "float32")
    values = ops.where(ops.isnan(values), ops.zeros_like(values), values)
    values = ops.clip(values, -FLOAT32_MAX, FLOAT32_MAX)
    blocked = _blocked(values, block_size)
    absmax = ops.max(ops.abs(blocked), axis=1)
    scales = ops.where(ops.greater(absmax, 0.0), absmax, ops.ones_like(absmax))
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
    return _unblocked(codes, shape), scales


def dequantize_blockwise(codes, scales, block_size: int, code: str = "sqrt"):
    """The float32 values of int8 `codes` with their block `scales`."""
    shape = tuple(codes.shape)
    blocked = ops.cast(_blocked(ops.cast(codes, "int8"), block_size), "float32")
    fractions = ops.divide(blocked, float(CODE_MAX))
    if code == "sqrt":
        fractions = ops.multiply(fractions, ops.abs(fractions))
    values = ops.multiply(fractions, ops.expand_dims(ops.cast(scales, "float32"), 1))
    return _unblocked(values, shape)
