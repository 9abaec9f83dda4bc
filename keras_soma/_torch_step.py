"""Private: the updates as in-place and multi-tensor torch ops.

The fused path on PyTorch outside torch.compile (see `_fused`), which is
Keras's default `fit` path on torch (`jit_compile="auto"` is eager there).
Run op by op, each `keras.ops` call of the pure update functions (in
`soma.py`, `gradsign.py`, `sm3.py`) writes a full-size temporary that the
next one reads: several times the bytes the step has to move. Here each
update is written once more with torch's in-place ops (`mul_`, `add_`,
`addcmul_`, `addcdiv_`) and multi-tensor `torch._foreach_*` ops, so that a
step makes a few passes over memory per variable. Soma's and GradSign's
temporaries are made `CHUNK` elements at a time (`chunks`), in buffers
reused from chunk to chunk (`Scratch`): a step of a 10 GB table adds 1 MB
(int8 Soma: 2 MB) to the peak, not a table-sized copy. SM3's rank >= 2
step goes a block of rows of about `CHUNK` elements at a time
(`_sm3_rows`), its `nu` a block's size.

The functions take torch tensors (the `.value` of Keras variables, which
they update in place) and run under `torch.no_grad()` (the caller's). The
numbers are the numpy reference's (`keras_soma._reference`) up to float32
rounding; where a rewriting changes the rounding it is said. Rare cases
whose exact handling would cost a pass every step (a NaN average for Soma,
saturated or non-finite accumulators for SM3) are detected with one small
reduction and handled exactly.
"""

from __future__ import annotations

import math

import torch

from keras_soma import _quantize, _sm3_math

FLOAT32_MAX = _sm3_math.FLOAT32_MAX
CODE_MAX = _quantize.CODE_MAX
# Elements per piece of an elementwise step (`chunks`): 1 MB of float32,
# large enough that the Python loop costs little beside the ops, small
# enough that a temporary stays in a core's L2 cache between the op that
# writes it and the op that reads it (measured on torch's CPU step:
# GradSign 0.93 x Soma's time with 4 MB pieces, 0.73-0.76 with 1 MB).
CHUNK = 1 << 18


def chunks(*tensors):
    """Matching flat pieces of `tensors` (all with one number of elements),
    `CHUNK` elements at a time: views, so that in-place ops on a piece
    write the tensor. The tensors written in place (variables and state)
    are contiguous; a gradient that is not is copied once, flat."""
    # `split` makes every piece's view in one call: slicing them one by one
    # in Python cost about a tenth of GradSign's step.
    return zip(*(flat(tensor).split(CHUNK) for tensor in tensors), strict=True)


def flat(tensor):
    """`tensor` flattened: a view where it is contiguous (the variables and
    state written in place are), else a copy (a gradient may not be)."""
    return tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)


class Scratch:
    """Temporaries for one step, reused from chunk to chunk and variable to
    variable: one flat buffer per dtype, as large as the largest tensor
    asked for, whose first elements serve each. A fresh large temporary
    per op costs more than the op on CPU (the allocator hands large blocks
    back to the system, and every new one is faulted in page by page)."""

    def __init__(self):
        self._buffers = {}

    def like(self, tensor, dtype=None, key=0):
        """An uninitialized tensor of `tensor`'s shape and `dtype` (by
        default its own): the same memory on every call with that dtype
        and `key` (grown where a larger one is asked for); another `key`
        gives a second buffer of the same dtype."""
        count = tensor.numel()
        buffer = self.flat(count, dtype or tensor.dtype, tensor.device, key)
        # A step's chunks are flat and mostly of one size: no view to make.
        return buffer if tensor.dim() == 1 else buffer.view(tensor.shape)

    def flat(self, count: int, dtype, device, key=0):
        """An uninitialized flat tensor of `count` elements (see `like`)."""
        buffer = self._buffers.get((dtype, key))
        if buffer is None or buffer.numel() < count:
            buffer = torch.empty(count, dtype=dtype, device=device)
            self._buffers[(dtype, key)] = buffer
        return buffer if buffer.numel() == count else buffer[:count]


def decay(value, rate) -> None:
    """Decoupled weight decay in place: `value - value * rate` with `rate`
    (weight_decay * learning_rate, a scalar tensor) or nothing for None.
    The reference rounds `(value * weight_decay) * learning_rate`; the
    difference is in the last bit of the decay term."""
    if rate is not None:
        value.addcmul_(value, rate, value=-1)


def soma(
    values,
    gradients,
    averages,
    learning_rate,
    momentum: float,
    decay_rates,
    starts: bool = True,
    ends: bool = True,
    steps: int = 1,
    average_bound: float | None = None,
) -> None:
    """Soma's step (`soma.soma_update`) for float32 variables and
    gradients, with float32 averages, or bfloat16 or float16 ones
    (`average_bound`: their dtype's largest finite value); with gradient
    accumulation folded into the average, `soma.soma_micro_step`
    (`starts`, `ends`: the micro-step's place in its window of `steps`).

    Passes per variable: the average is scaled and the gradient added in
    place (two), the sign is taken (one, into a chunk-sized temporary) and
    the variable moved by `learning_rate` times it (one). A bfloat16 or
    float16 average is updated in a float32 temporary, chunk by chunk, and
    stored once, saturating, as the reference rounds it.
    """
    scratch = Scratch()
    if average_bound is None:
        if starts:
            torch._foreach_mul_(averages, momentum)
        torch._foreach_add_(averages, gradients, alpha=(1.0 - momentum) / steps)
    else:
        for average, gradient in zip(averages, gradients):
            for average_piece, gradient_piece in chunks(average, gradient):
                wide = scratch.like(average_piece, torch.float32)
                wide.copy_(average_piece)
                if starts:
                    wide.mul_(momentum)
                wide.add_(gradient_piece, alpha=(1.0 - momentum) / steps)
                wide.clamp_(-average_bound, average_bound)
                average_piece.copy_(wide)
    if not ends:
        return
    for value, average, rate in zip(values, averages, decay_rates):
        decay(value, rate)
        for value_piece, average_piece in chunks(value, average):
            if average.dtype == value.dtype:
                sign = torch.sign(average_piece, out=scratch.like(average_piece))
            else:
                # bfloat16 or float16 to float32 is exact; the sign is the
                # stored one's.
                sign = scratch.like(value_piece).copy_(average_piece).sign_()
            value_piece.addcmul_(sign, learning_rate, value=-1)
    # torch's sign is 0 for NaN, where the reference's is NaN (a NaN
    # average makes its parameter NaN): a NaN average is rare, and found by
    # one max per average (a max is NaN where an element is), in one sync.
    peaks = torch.stack([torch.amax(average).float() for average in averages])
    if bool(torch.isnan(peaks).any()):
        for value, average in zip(values, averages):
            value.masked_fill_(torch.isnan(average), float("nan"))


def soma_int8(
    values,
    gradients,
    codes,
    scales,
    learning_rate,
    momentum: float,
    block_size: int,
    decay_rates,
    starts: bool = True,
    ends: bool = True,
    steps: int = 1,
) -> None:
    """Soma's step on a blockwise int8 average (`soma.on_int8_average` of
    `soma_update` or `soma_micro_step`) for float32 variables and
    gradients: `codes[i]` are a variable's int8 codes, `scales[i]` its
    float32 block scales (the format of `keras_soma._quantize`, the sqrt
    code, nearest rounding).

    A piece of whole blocks (about `CHUNK` elements) at a time: the piece
    is dequantized into a float32 temporary, updated there, the variable
    moved by its sign, and requantized with each block's new largest
    magnitude, with the reference's rounding op for op (`dequantize_into`,
    `requantize`), so that the codes and scales are the reference's to the
    bit.

    A NaN gradient element makes its average NaN, and the reference's
    variable NaN there; torch's sign is 0 for NaN, so NaN gradients are
    found by one max per piece of a step that moves the variables (NaN
    where an element is), in one sync, and marked in the variables
    afterwards. The stored average, as the
    reference's, holds 0 there.
    """
    scratch = Scratch()
    span = max(1, CHUNK // block_size) * block_size
    peaks = []
    for value, gradient, code, scale, rate in zip(
        values, gradients, codes, scales, decay_rates
    ):
        if ends:
            decay(value, rate)
        value_flat, gradient_flat, code_flat = flat(value), flat(gradient), flat(code)
        for start in range(0, code.numel(), span):
            end = min(code.numel(), start + span)
            count = end - start
            blocks = -(-count // block_size)
            first = start // block_size
            block_scales = scale[first : first + blocks]
            wide = scratch.flat(blocks * block_size, torch.float32, value.device, 0)
            other = scratch.flat(blocks * block_size, torch.float32, value.device, 1)
            average, spare = wide[:count], other[:count]
            dequantize_into(wide, code_flat[start:end], block_scales, other)
            if starts:
                average.mul_(momentum)
            average.add_(
                torch.mul(gradient_flat[start:end], (1.0 - momentum) / steps, out=spare)
            )
            if ends:
                # Only a step that moves the variable needs the NaN check.
                peaks.append(torch.amax(spare))
                sign = torch.sign(average, out=spare)
                value_flat[start:end].addcmul_(sign, learning_rate, value=-1)
            average.nan_to_num_(nan=0.0, posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX)
            requantize(wide, code_flat[start:end], block_scales, other)
    if peaks and bool(torch.isnan(torch.stack(peaks)).any()):
        for value, gradient in zip(values, gradients):
            value.masked_fill_(torch.isnan(gradient), float("nan"))


def dequantize_into(wide, codes, block_scales, spare) -> None:
    """`wide[:n]` (float32, whole blocks) <- the values of the `n` int8
    `codes` with their `block_scales`, `(c / 127) * |c / 127| * scale` (the
    sqrt code) as the reference computes it; `wide[n:]`, the padding of a
    partial last block, <- 0 as the reference pads. `spare` is a float32
    temporary at least `n` long."""
    count = codes.numel()
    blocks = block_scales.numel()
    values = wide[:count]
    wide[count:].zero_()
    values.copy_(codes).div_(CODE_MAX)
    values.mul_(torch.abs(values, out=spare[:count]))
    wide.view(blocks, -1).mul_(block_scales[:, None])


def requantize(wide, codes, block_scales, spare) -> None:
    """`codes` and `block_scales` <- the sqrt code of the finite float32
    values in `wide` (whole blocks, zero past the codes), each block scaled
    by its largest magnitude (1 for a block of zeros), rounded to nearest
    with the reference's ops: `127 * sign(x) * sqrt(|x| / scale)` rounded
    as `copysign(round(127 * sqrt(|x| / scale)), x)` (the same number:
    rounding to nearest even is symmetric), and the clip to +-127 left out
    (|x| <= scale bounds the code). `spare` is a float32 temporary of
    `wide`'s size."""
    magnitude = torch.abs(wide, out=spare)
    blocked = magnitude.view(block_scales.numel(), -1)
    largest = torch.amax(blocked, dim=1)
    block_scales.copy_(torch.where(largest > 0, largest, 1.0))
    blocked.div_(block_scales[:, None])
    magnitude.sqrt_().mul_(CODE_MAX).round_().copysign_(wide)
    codes.copy_(magnitude[: codes.numel()])


def gradsign(values, gradients, counters, learning_rate, decay_rates) -> None:
    """GradSign's step (`gradsign.gradsign_update`) for float32 variables
    and gradients and int8 counters.

    torch's sign is 0 for NaN and +-1 for +-Inf: GradSign's NaN-safe sign
    as it is. The counter is updated in int8 (three passes over one byte a
    parameter, one more to add the sign); the variable moves by
    `(learning_rate / 64) * c`, the reference's `learning_rate * (c / 64)`
    to the bit (both scalings by 64 are exact).
    """
    step = learning_rate / 64
    scratch = Scratch()
    for value, gradient, counter, rate in zip(values, gradients, counters, decay_rates):
        decay(value, rate)
        for value_piece, gradient_piece, counter_piece in chunks(
            value, gradient, counter
        ):
            # c - floor((c + 4) / 8) as an arithmetic shift, as the reference.
            small = torch.add(counter_piece, 4, out=scratch.like(counter_piece))
            counter_piece.sub_(small.bitwise_right_shift_(3))
            sign = torch.sign(gradient_piece, out=scratch.like(gradient_piece))
            counter_piece.add_(small.copy_(sign), alpha=8)
            value_piece.addcmul_(sign.copy_(counter_piece), step, value=-1)


def sm3(
    values,
    gradients,
    accumulators,
    momenta,
    learning_rate,
    momentum: float,
    beta_2: float,
    epsilon: float,
    decay_rates,
    block_size: int | None = None,
) -> list[int]:
    """SM3's variant II step (`sm3.sm3_update`) for float32 variables and
    gradients, with `epsilon > 0`; returns the positions of the variables
    it left untouched, for the exact op-by-op update.

    `accumulators[i]` is the list of a variable's accumulators (one per
    axis for rank >= 2, one full-size for rank 0 and 1) and `momenta[i]`
    its float32 momentum, None (momentum 0), or with `block_size` a pair
    `(codes, scales)` of a blockwise int8 momentum (the format of
    `keras_soma._quantize`): dequantized a piece of whole blocks at a time
    into a float32 temporary, updated there, used to move the variable and
    requantized (`dequantize_into`, `requantize`), so that the variable
    moves by the float32 momentum, as in `SM3.update_step`.

    For rank >= 2, `epsilon` is added to the accumulators (vectors) before
    their minimum is broadcast, rather than to the full-size `nu`: `nu +
    epsilon` is then made in the pass that adds `g * g`, and the new
    accumulators are the maxima less `epsilon` (the same numbers but for
    rounding where `nu` is not large beside `epsilon`: an accumulator
    below half of `epsilon`'s float32 rounding unit (about 5e-38 at the
    default 1e-30) is stored as 0; the update, where `epsilon` dominates
    `nu + epsilon` anyway, is the same). The clip of
    the update to its bound, a no-op but for rounding where nothing
    saturated, is left out. A rank >= 2 variable is stepped a block of
    rows at a time (`_sm3_rows`), so that its `nu` is never whole. A
    variable whose `nu` might not be finite (a NaN gradient, a square
    near float32's largest value, saturated accumulators: `_nu_is_finite`)
    is left to the exact update.
    """
    scale = 1.0 if beta_2 == 1.0 else 1.0 - beta_2
    bound = _sm3_math.update_bound(beta_2)
    scratch = Scratch()
    left = []
    for index, (value, gradient, slots, momentum_value, decay_rate) in enumerate(
        zip(values, gradients, accumulators, momenta, decay_rates)
    ):
        if gradient.dim() >= 2:
            if not _nu_is_finite(gradient, slots, beta_2, epsilon, scale):
                left.append(index)
                continue
            decay(value, decay_rate)
            _sm3_rows(
                value,
                gradient,
                slots,
                momentum_value,
                learning_rate,
                momentum,
                beta_2,
                epsilon,
                scale,
                scratch,
                block_size,
            )
            continue
        (slot,) = slots
        if beta_2 != 1.0:
            slot.mul_(beta_2)
        slot.addcmul_(gradient, gradient, value=scale).clamp_max_(FLOAT32_MAX)
        update = torch.where(
            slot > 0, gradient / torch.sqrt(slot + epsilon), 0.0
        ).clamp_(-bound, bound)
        decay(value, decay_rate)
        _move(
            value,
            update,
            momentum_value,
            learning_rate,
            momentum,
            block_size,
            scratch,
            0,
        )
    return left


def _move(
    value, update, momentum_value, learning_rate, momentum, block_size, scratch, first
) -> None:
    """`value -= learning_rate * m` with `m` the new momentum `momentum * m
    + (1 - momentum) * update` (in place), or `update` itself where
    `momentum_value` is None; an int8 momentum `(codes, scales)` is
    dequantized from its element `first` on (the start of a block), updated
    in a float32 temporary and requantized. `value` and `update` are the
    matching pieces of one variable, `update` a float32 temporary that may
    be overwritten."""
    if momentum_value is None:
        value.addcmul_(update, learning_rate, value=-1)
        return
    if block_size is None:
        momentum_value.mul_(momentum).add_(update, alpha=1.0 - momentum)
        value.addcmul_(momentum_value, learning_rate, value=-1)
        return
    codes, scales = momentum_value
    count = update.numel()
    blocks = -(-count // block_size)
    block_scales = scales[first // block_size :][:blocks]
    piece_codes = flat(codes)[first : first + count]
    wide = scratch.flat(blocks * block_size, torch.float32, update.device, 2)
    spare = scratch.flat(blocks * block_size, torch.float32, update.device, 3)
    dequantize_into(wide, piece_codes, block_scales, spare)
    average = wide[:count].view(update.shape)
    average.mul_(momentum).add_(update, alpha=1.0 - momentum)
    value.addcmul_(average, learning_rate, value=-1)
    requantize(wide, piece_codes, block_scales, spare)


def _nu_is_finite(gradient, slots, beta_2, epsilon, scale) -> bool:
    """Whether `nu = beta_2 * min_r A_r + epsilon + scale * g * g` is
    finite everywhere, with a margin, from the gradient's extremes and
    each accumulator vector's maximum (no full-size temporary, one sync):
    False also where it is finite but within a factor 4 of float32's
    largest value, for a NaN gradient (NaN compares False) and for a
    variable without elements."""
    if gradient.numel() == 0:
        return False
    low, high = torch.aminmax(gradient)
    largest = torch.maximum(low.abs(), high.abs()).double()
    cover = torch.stack([torch.amax(slot) for slot in slots]).amin().double()
    cover = cover * beta_2 + epsilon
    limit = FLOAT32_MAX / 4
    square = largest * largest
    return bool((square < limit) & (scale * square + cover < limit))


def _sm3_rows(
    value,
    gradient,
    slots,
    momentum_value,
    learning_rate,
    momentum,
    beta_2,
    epsilon,
    scale,
    scratch,
    block_size=None,
) -> None:
    """SM3's rank >= 2 step (`sm3`) over blocks of about `CHUNK` elements
    along the first axis: a block's `nu` gives its rows' new first-axis
    accumulators (written at once: no later block reads them) and running
    maxima for the other axes (written after the last block, since every
    block reads them); the variable and its momentum move block by block.
    The numbers are those of one block: a maximum is exact. With an int8
    momentum (`block_size`), a block of rows is a whole number of the
    momentum's blocks (a multiple of `block_size / gcd(row length,
    block_size)` rows), so that no quantization block is split."""
    rank = gradient.dim()
    rate = float(learning_rate)
    rows = gradient.shape[0]
    row_length = max(1, gradient[0].numel())
    step_rows = max(1, CHUNK // row_length)
    if block_size is not None:
        aligned = block_size // math.gcd(row_length, block_size)
        step_rows = max(1, step_rows // aligned) * aligned
    first, others = slots[0], slots[1:]
    maxima = [None] * len(others)
    for start in range(0, rows, step_rows):
        end = min(rows, start + step_rows)
        block = gradient[start:end]
        nu = _cover(
            [first[start:end], *others], rank, beta_2, epsilon, scratch.like(block)
        )
        nu.addcmul_(block, block, value=scale)
        first[start:end].copy_(
            torch.amax(nu, dim=tuple(range(1, rank)))
            .sub_(epsilon)
            .clamp_max_(FLOAT32_MAX)
        )
        for position in range(len(others)):
            axis = position + 1
            maximum = torch.amax(
                nu, dim=tuple(other for other in range(rank) if other != axis)
            )
            if maxima[position] is None:
                maxima[position] = maximum
            else:
                torch.maximum(maxima[position], maximum, out=maxima[position])
        update = nu.sqrt_()  # sqrt(nu + epsilon); divided into g below
        value_block = value[start:end]
        if momentum_value is None:
            value_block.addcdiv_(block, update, value=-rate)
            continue
        torch.div(block, update, out=update)
        if block_size is None:
            momentum_block = momentum_value[start:end]
        else:
            momentum_block = momentum_value
        _move(
            value_block,
            update,
            momentum_block,
            learning_rate,
            momentum,
            block_size,
            scratch,
            start * row_length,
        )
    for slot, maximum in zip(others, maxima):
        slot.copy_(maximum.sub_(epsilon).clamp_max_(FLOAT32_MAX))


def _cover(slots, rank: int, beta_2: float, epsilon: float, out):
    """`beta_2 * min_r A_r + epsilon`, broadcast to the variable's shape in
    `out`, from the accumulator vectors `slots` (at least two)."""
    cover = None
    for axis, slot in enumerate(slots):
        vector = slot * beta_2 if beta_2 != 1.0 else slot
        shape = [1] * rank
        shape[axis] = -1
        vector = torch.add(vector, epsilon).reshape(shape)
        if cover is None:
            cover = vector
        elif axis == rank - 1:
            cover = torch.minimum(cover, vector, out=out)
        else:
            cover = torch.minimum(cover, vector)
    return cover
