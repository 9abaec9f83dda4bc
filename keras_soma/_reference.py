"""Plain numpy versions of every keras_soma update: the single source of the
math that the tests compare the Keras implementations against.

Each optimizer has two functions with the same slot names as
`optimizer.get_slots(variable)`:

* `<name>_init(variable, **hyperparameters) -> dict[str, np.ndarray]`
  (hyperparameters that do not shape the state are accepted and ignored,
  so that one dict of constructor arguments serves both functions)
* `<name>_step(variable, gradient, state, learning_rate,
  weight_decay=None, **hyperparameters) -> (new_variable, new_state)`

They are written to be obviously right, not fast, and they reproduce the
dtype rules of the Keras code: the learning rate (a float32 in Keras) is
cast to the variable's dtype; anything computed "in float32" here is
computed in float32 there. `bfloat16` comes from `ml_dtypes`, which both
TensorFlow and JAX depend on.

The only library code used here is `numpy_dtype`, the mapping of Keras dtype
names to numpy dtypes; none of the update math is shared.
"""

from __future__ import annotations

import numpy as np

try:  # bfloat16's finfo; installed with TensorFlow, JAX and Keras.
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

from keras_soma._common import numpy_dtype

State = dict[str, np.ndarray]


def _cast_learning_rate(learning_rate, dtype) -> np.ndarray:
    return np.asarray(np.float32(learning_rate)).astype(dtype)


def apply_weight_decay(variable, learning_rate, weight_decay: float | None):
    """Keras's decoupled weight decay: theta - theta * wd * lr."""
    if weight_decay is None:
        return variable
    dtype = variable.dtype
    decay = np.asarray(np.float32(weight_decay)).astype(dtype)
    rate = _cast_learning_rate(learning_rate, dtype)
    return (variable - (variable * decay) * rate).astype(dtype)


def _finfo(dtype):
    return ml_dtypes.finfo(dtype) if ml_dtypes is not None else np.finfo(dtype)


def _saturating_astype(values: np.ndarray, dtype) -> np.ndarray:
    """`values.astype(dtype)`, where values beyond a narrower `dtype`'s
    range (infinities included) become its largest finite value with their
    sign; NaN stays NaN."""
    dtype = np.dtype(dtype)
    if dtype != values.dtype and _finfo(dtype).max < _finfo(values.dtype).max:
        bound = _finfo(dtype).max
        values = np.clip(values, -bound, bound)
    return values.astype(dtype)


def sign_with_zero(values: np.ndarray) -> np.ndarray:
    """sign(x) with sign(0) = 0 and sign(NaN) = 0, as an int array."""
    return (values > 0).astype(np.int32) - (values < 0).astype(np.int32)


# ---------------------------------------------------------------------------
# Blockwise int8 state (the format of keras_soma._quantize)
# ---------------------------------------------------------------------------

CODE_MAX = 127


def int8_block_count(shape, block_size: int) -> int:
    """ceil(size / block_size) blocks, at least one."""
    size = int(np.prod(shape, dtype=np.int64))
    return max(1, -(-size // block_size))


def quantize_blockwise(
    values: np.ndarray,
    block_size: int,
    uniform: np.ndarray | None = None,
    code: str = "sqrt",
) -> tuple[np.ndarray, np.ndarray]:
    """Float values -> (int8 codes of their shape, float32 block scales).

    Blocks are `block_size` consecutive elements of the row-major
    flattening (the last one partial); a block's scale is its largest
    magnitude, or 1 for a block of zeros; a code is
    `127 * sign(x) * sqrt(|x| / scale)` (`code="sqrt"`, Soma's format) or
    `127 * x / scale` (`code="linear"`) rounded to nearest (ties to even)
    or, with `uniform` (random numbers in [0, 1) of shape
    `[blocks, block_size]`), `floor(x + uniform)`. NaN counts as 0 and
    values beyond float32's range saturate.
    """
    shape = np.shape(values)
    flat = np.asarray(values, np.float32).reshape(-1)
    flat = np.where(np.isnan(flat), np.float32(0), flat)
    bound = np.finfo(np.float32).max
    flat = np.clip(flat, -bound, bound).astype(np.float32)
    blocks = int8_block_count(shape, block_size)
    padded = np.zeros(blocks * block_size, np.float32)
    padded[: flat.size] = flat
    blocked = padded.reshape(blocks, block_size)
    absmax = np.abs(blocked).max(axis=1)
    scales = np.where(absmax > 0, absmax, np.float32(1)).astype(np.float32)
    scaled = (blocked / scales[:, None]).astype(np.float32)
    if code == "sqrt":
        scaled = (np.sign(scaled) * np.sqrt(np.abs(scaled))).astype(np.float32)
    scaled = scaled * np.float32(CODE_MAX)
    if uniform is None:
        codes = np.round(scaled)
    else:
        codes = np.floor(scaled + np.asarray(uniform, np.float32))
    codes = np.clip(codes, -CODE_MAX, CODE_MAX).astype(np.int8)
    return codes.reshape(-1)[: flat.size].reshape(shape), scales


def dequantize_blockwise(
    codes: np.ndarray, scales: np.ndarray, block_size: int, code: str = "sqrt"
) -> np.ndarray:
    """The float32 values of int8 codes: `sign(c) * (c / 127) ** 2 * scale`
    (`code="sqrt"`) or `c / 127 * scale` (`code="linear"`)."""
    shape = np.shape(codes)
    flat = np.asarray(codes).reshape(-1).astype(np.float32)
    per_element = np.repeat(np.asarray(scales, np.float32), block_size)[: flat.size]
    fractions = (flat / np.float32(CODE_MAX)).astype(np.float32)
    if code == "sqrt":
        fractions = fractions * np.abs(fractions)
    values = fractions * per_element
    return values.astype(np.float32).reshape(shape)


# ---------------------------------------------------------------------------
# Soma
# ---------------------------------------------------------------------------


def soma_init(
    variable: np.ndarray,
    momentum_dtype: str = "float32",
    block_size: int = 256,
    **unused,
) -> State:
    if momentum_dtype == "int8":
        return {
            "momentum": np.zeros(variable.shape, np.int8),
            "momentum_scale": np.ones(
                int8_block_count(variable.shape, block_size), np.float32
            ),
        }
    return {"momentum": np.zeros(variable.shape, numpy_dtype(momentum_dtype))}


def soma_step(
    variable: np.ndarray,
    gradient: np.ndarray,
    state: State,
    learning_rate: float,
    weight_decay: float | None = None,
    momentum: float = 0.95,
    momentum_dtype: str = "float32",
    block_size: int = 256,
) -> tuple[np.ndarray, State]:
    """m <- momentum * m + (1 - momentum) * g;  theta <- theta - lr * sign(m).

    With `momentum_dtype="int8"` the stored `m` is dequantized first, the
    variable moves by the sign of the float32 `m`, and `m` is requantized
    (`quantize_blockwise`, nearest rounding).
    """
    variable = apply_weight_decay(variable, learning_rate, weight_decay)
    previous = _soma_stored_average(state, momentum_dtype, block_size)
    average = previous * np.float32(momentum) + _saturating_astype(
        gradient, np.float32
    ) * np.float32(1.0 - momentum)
    return _soma_move_and_store(
        variable, average, state, learning_rate, momentum_dtype, block_size
    )


def _soma_stored_average(state: State, momentum_dtype: str, block_size: int):
    """Soma's stored average in float32 (int8: dequantized)."""
    if momentum_dtype == "int8":
        return dequantize_blockwise(
            state["momentum"], state["momentum_scale"], block_size
        )
    return state["momentum"].astype(np.float32)


def _soma_move_and_store(
    variable, average, state: State, learning_rate, momentum_dtype, block_size
):
    """The variable moved by `lr * sign(average)` (the float32 average, or
    the stored one where it is stored as bfloat16/float16, saturating),
    and the new state (int8: the float32 average requantized)."""
    dtype = variable.dtype
    if momentum_dtype == "int8":
        codes, scales = quantize_blockwise(average, block_size)
        new_state = {"momentum": codes, "momentum_scale": scales}
    else:
        average = _saturating_astype(average, state["momentum"].dtype)
        new_state = {"momentum": average}
    step = _cast_learning_rate(learning_rate, dtype) * np.sign(
        average.astype(dtype)
    ).astype(dtype)
    return (variable - step).astype(dtype), new_state


def soma_micro_step(
    variable: np.ndarray,
    gradient: np.ndarray,
    state: State,
    learning_rate: float,
    accumulation_steps: int,
    starts: bool,
    momentum: float = 0.95,
    momentum_dtype: str = "float32",
    block_size: int = 256,
) -> tuple[np.ndarray, State]:
    """One micro-step of Soma's gradient accumulation folded into the
    average (`keras_soma.soma.soma_micro_step`):

        m <- momentum * m  (at a window's first micro-step only)
        m <- m + (1 - momentum) / accumulation_steps * g
        theta <- theta - lr * sign(m)

    Soma keeps the move at a window's last micro-step only (with weight
    decay, as `soma_step`); there `m` is what `soma_step` makes of the
    window's mean gradient, up to float32 rounding. With
    `momentum_dtype="int8"`, `m` is dequantized and requantized at every
    micro-step.
    """
    average = _soma_stored_average(state, momentum_dtype, block_size)
    if starts:
        average = average * np.float32(momentum)
    average = average + _saturating_astype(gradient, np.float32) * np.float32(
        (1.0 - momentum) / accumulation_steps
    )
    return _soma_move_and_store(
        variable, average, state, learning_rate, momentum_dtype, block_size
    )


def majority_vote_soma_step(
    variable: np.ndarray,
    worker_gradients: np.ndarray,
    worker_momenta: np.ndarray,
    learning_rate: float,
    weight_decay: float | None = None,
    momentum: float = 0.95,
    skip_nonfinite: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of majority-vote Soma over N workers (`keras_soma.distribute`).

    `worker_gradients` and `worker_momenta` are `[N, *variable.shape]`:
    worker k's gradient of its own shard of the batch and its momentum.

    m_k   <- momentum * m_k + (1 - momentum) * g_k       (each worker)
    tally  = sum_k sign(m_k)          (int; sign(0) = sign(NaN) = 0: abstain)
    theta <- theta - theta * wd * lr - lr * sign(tally)  (ties: no move)

    With `skip_nonfinite`, a non-finite gradient on any worker leaves the
    variable and every momentum as they were (the tally is still returned).
    Returns `(new_variable, new_momenta, tally)`.
    """
    dtype = variable.dtype
    momenta = worker_momenta.astype(np.float32) * np.float32(
        momentum
    ) + _saturating_astype(worker_gradients, np.float32) * np.float32(1.0 - momentum)
    momenta = _saturating_astype(momenta, worker_momenta.dtype)
    tally = sign_with_zero(momenta).sum(axis=0)
    if skip_nonfinite and not np.all(np.isfinite(worker_gradients)):
        return variable, worker_momenta, tally
    decayed = apply_weight_decay(variable, learning_rate, weight_decay)
    step = _cast_learning_rate(learning_rate, dtype) * np.sign(tally).astype(dtype)
    return (decayed - step).astype(dtype), momenta, tally


def clip_gradients(
    gradients: list,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
) -> list:
    """Keras's gradient clipping of one step's gradients (one option at
    most; values <= 0 are ignored, as Keras does): each gradient to norm
    `clipnorm`, all of them together to norm `global_clipnorm`, or each
    element to +-`clipvalue`; computed in float32."""
    gradients = [np.asarray(gradient, np.float32) for gradient in gradients]

    def norm(values):
        return np.sqrt(np.sum(np.square(values), dtype=np.float32))

    if clipnorm is not None and clipnorm > 0:
        bound = np.float32(clipnorm)
        return [g * bound / np.maximum(norm(g), bound) for g in gradients]
    if global_clipnorm is not None and global_clipnorm > 0:
        bound = np.float32(global_clipnorm)
        total = np.sqrt(sum(np.square(norm(g)) for g in gradients))
        return [g * (bound / np.maximum(total, bound)) for g in gradients]
    if clipvalue is not None and clipvalue > 0:
        bound = np.float32(clipvalue)
        return [np.clip(g, -bound, bound) for g in gradients]
    return gradients


def soma_accumulated_steps(
    variables: list,
    gradients: list,
    states: list,
    learning_rate,
    weight_decay: float | None = None,
    momentum: float = 0.95,
    momentum_dtype: str = "float32",
    block_size: int = 256,
    accumulation_steps: int = 1,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    skip_nonfinite: bool = False,
) -> tuple[list, list, int]:
    """Soma on several variables with Keras's gradient accumulation, as
    Keras runs it with an accumulator: micro-step by micro-step.

    Each micro-step's gradients are summed; at every `accumulation_steps`-th
    micro-step the sums are divided by `accumulation_steps`, clipped as
    Keras clips one step's gradients, and `soma_step` applies that mean
    (weight decay included) with the learning rate of that micro-step; the
    sums restart at zero. A trailing partial window has not stepped.
    `accumulation_steps=1` is Soma without accumulation.

    With `skip_nonfinite`, a micro-step in which any gradient holds NaN or
    Inf is counted; without accumulation it is skipped (nothing changes),
    with accumulation its gradients count as zeros.

    Args:
        variables: One array per variable.
        gradients: One list per micro-step, of one gradient per variable.
        states: One `soma_init` state per variable.
        learning_rate: A float, or a function of the number of micro-steps
            before the current one (what Keras passes a schedule).
        accumulation_steps: The window length, `gradient_accumulation_steps`.

    Returns:
        `(variables, states, skipped)`: the values after the last
        micro-step and how many micro-steps held non-finite gradients.
    """
    variables = list(variables)
    states = list(states)
    sums = [np.zeros(np.shape(v), np.float32) for v in variables]
    skipped = 0
    for index, step_gradients in enumerate(gradients):
        step_gradients = [np.asarray(g, np.float32) for g in step_gradients]
        if skip_nonfinite and not all(np.isfinite(g).all() for g in step_gradients):
            skipped += 1
            if accumulation_steps == 1:
                continue
            step_gradients = [np.zeros_like(g) for g in step_gradients]
        sums = [total + g for total, g in zip(sums, step_gradients)]
        if (index + 1) % accumulation_steps:
            continue
        means = [total / np.float32(accumulation_steps) for total in sums]
        means = clip_gradients(means, clipnorm, clipvalue, global_clipnorm)
        rate = learning_rate(index) if callable(learning_rate) else learning_rate
        stepped = [
            soma_step(
                variable,
                mean,
                state,
                rate,
                weight_decay=weight_decay,
                momentum=momentum,
                momentum_dtype=momentum_dtype,
                block_size=block_size,
            )
            for variable, mean, state in zip(variables, means, states)
        ]
        variables = [variable for variable, _ in stepped]
        states = [state for _, state in stepped]
        sums = [np.zeros_like(total) for total in sums]
    return variables, states, skipped


# ---------------------------------------------------------------------------
# GradSign
# ---------------------------------------------------------------------------


def gradsign_init(variable: np.ndarray, **unused) -> State:
    return {"sign_counter": np.zeros(variable.shape, np.int8)}


def gradsign_counter_update(counter: np.ndarray, gradient: np.ndarray):
    """c - floor((c + 4) / 8) + 8 * sign(g), in int32 (not yet stored)."""
    count = counter.astype(np.int32)
    count = count - np.floor_divide(count + 4, 8)
    return count + 8 * sign_with_zero(gradient)


def gradsign_step(
    variable: np.ndarray,
    gradient: np.ndarray,
    state: State,
    learning_rate: float,
    weight_decay: float | None = None,
) -> tuple[np.ndarray, State]:
    """c <- c - floor((c+4)/8) + 8 sign(g);  theta <- theta - lr * c / 64."""
    dtype = variable.dtype
    variable = apply_weight_decay(variable, learning_rate, weight_decay)
    count = gradsign_counter_update(state["sign_counter"], gradient)
    averaged_sign = (count.astype(dtype) / dtype.type(64)).astype(dtype)
    step = (_cast_learning_rate(learning_rate, dtype) * averaged_sign).astype(dtype)
    return (variable - step).astype(dtype), {"sign_counter": count.astype(np.int8)}


# ---------------------------------------------------------------------------
# SM3
# ---------------------------------------------------------------------------


def sm3_init(
    variable: np.ndarray,
    momentum: float = 0.9,
    momentum_dtype: str | None = None,
    block_size: int = 256,
    **unused,
) -> State:
    """Rank >= 2: one float32 vector per axis (`accumulator_<axis>`);
    rank 0 and 1: one full-size float32 `accumulator`; plus, when
    momentum > 0, a `momentum` of the variable's shape, in `momentum_dtype`
    (None: the variable's dtype), or as Soma's blockwise int8 (`momentum`
    codes and `momentum_scale`)."""
    if variable.ndim >= 2:
        state = {
            f"accumulator_{axis}": np.zeros((dimension,), np.float32)
            for axis, dimension in enumerate(variable.shape)
        }
    else:
        state = {"accumulator": np.zeros(variable.shape, np.float32)}
    if momentum > 0 and momentum_dtype == "int8":
        state.update(soma_init(variable, "int8", block_size))
    elif momentum > 0:
        state["momentum"] = np.zeros(
            variable.shape,
            variable.dtype if momentum_dtype is None else numpy_dtype(momentum_dtype),
        )
    return state


def _sm3_accumulate(previous: np.ndarray, squares: np.ndarray, beta_2: float):
    """Sum (beta_2 = 1) or moving average, saturated at the float32 max."""
    with np.errstate(over="ignore"):
        if beta_2 == 1.0:
            total = previous + squares
        else:
            total = previous * np.float32(beta_2) + squares * np.float32(1.0 - beta_2)
    return np.minimum(total, np.finfo(np.float32).max)


def _sm3_slice_max(values: np.ndarray, axis: int) -> np.ndarray:
    """max over every axis but `axis`: one number per slice along `axis`."""
    others = tuple(other for other in range(values.ndim) if other != axis)
    return values.max(axis=others) if others else values


def _sm3_broadcast(vector: np.ndarray, axis: int, rank: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = vector.shape[0]
    return vector.reshape(shape)


def _sm3_nu_and_accumulators(squares, accumulators, variant, beta_2):
    """`nu` (the variable's shape, or broadcastable to it) and the new
    accumulators of the cover given as {axis: vector}; a cover of
    {None: full-size accumulator} is diagonal AdaGrad."""
    rank = squares.ndim

    def minimum_over_cover(vectors):
        broadcast = [
            _sm3_broadcast(vector, axis, rank) for axis, vector in vectors.items()
        ]
        result = broadcast[0]
        for vector in broadcast[1:]:
            result = np.minimum(result, vector)
        return result

    if None in accumulators:
        nu = _sm3_accumulate(accumulators[None], squares, beta_2)
        return nu, {None: nu}
    if variant == "II":
        nu = _sm3_accumulate(minimum_over_cover(accumulators), squares, beta_2)
        return nu, {axis: _sm3_slice_max(nu, axis) for axis in accumulators}
    new = {
        axis: _sm3_accumulate(vector, _sm3_slice_max(squares, axis), beta_2)
        for axis, vector in accumulators.items()
    }
    return minimum_over_cover(new), new


def _sm3_move(
    variable, gradient, nu, momentum_value, learning_rate, momentum, beta_2, epsilon
):
    """u = g / sqrt(nu + eps) (0 where nu = 0), clipped to +-1 (sums) or
    +-1/sqrt(1 - beta_2) (averages), then momentum, and the move."""
    dtype = variable.dtype
    gradient = gradient.astype(np.float32)
    nu = np.broadcast_to(nu, gradient.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        update = np.where(
            nu > 0, gradient / np.sqrt(nu + np.float32(epsilon)), np.float32(0)
        ).astype(np.float32)
    bound = np.float32(1.0 if beta_2 == 1.0 else 1.0 / np.sqrt(1.0 - beta_2))
    update = np.clip(update, -bound, bound)
    direction = update
    new_momentum = None
    if momentum_value is not None:
        new_momentum = (
            momentum_value.astype(np.float32) * np.float32(momentum)
            + update * np.float32(1.0 - momentum)
        ).astype(momentum_value.dtype)
        direction = new_momentum
    step = _cast_learning_rate(learning_rate, dtype) * direction.astype(dtype)
    return (variable - step).astype(dtype), new_momentum


def sm3_step(
    variable: np.ndarray,
    gradient: np.ndarray,
    state: State,
    learning_rate: float,
    weight_decay: float | None = None,
    momentum: float = 0.9,
    beta_2: float = 1.0,
    epsilon: float = 1e-30,
    variant: str = "II",
    momentum_dtype: str | None = None,
    block_size: int = 256,
) -> tuple[np.ndarray, State]:
    """One dense SM3 step (variant I or II, sums or moving averages).

    II: nu = min_r A_r + g^2, A_r <- max of nu over the other axes.
    I:  A_r <- A_r + max of g^2 over the other axes, nu = min_r A_r.
    u = g / sqrt(nu + eps) (0 where nu = 0); m <- mu m + (1 - mu) u;
    theta <- theta - lr * m (u without momentum).

    A blockwise int8 `m` (`momentum_scale` in the state) is dequantized
    first, the variable moves by the float32 `m`, and `m` is requantized
    (`quantize_blockwise`, nearest rounding), as in `soma_step`.
    """
    variable = apply_weight_decay(variable, learning_rate, weight_decay)
    with np.errstate(over="ignore"):
        squares = np.square(gradient.astype(np.float32))
    if variable.ndim >= 2:
        accumulators = {
            axis: state[f"accumulator_{axis}"] for axis in range(variable.ndim)
        }
    else:
        accumulators = {None: state["accumulator"]}
    nu, new = _sm3_nu_and_accumulators(squares, accumulators, variant, beta_2)
    momentum_value = state.get("momentum")
    quantized = "momentum_scale" in state
    if quantized:
        momentum_value = dequantize_blockwise(
            momentum_value, state["momentum_scale"], block_size
        )
    new_variable, new_momentum = _sm3_move(
        variable,
        gradient,
        nu,
        momentum_value,
        learning_rate,
        momentum,
        beta_2,
        epsilon,
    )
    if variable.ndim >= 2:
        new_state = {f"accumulator_{axis}": new[axis] for axis in range(variable.ndim)}
    else:
        new_state = {"accumulator": new[None]}
    if quantized:
        codes, scales = quantize_blockwise(new_momentum, block_size)
        new_state.update({"momentum": codes, "momentum_scale": scales})
    elif new_momentum is not None:
        new_state["momentum"] = new_momentum
    return new_variable, new_state


def summed_rows(indices: np.ndarray, values: np.ndarray):
    """`(rows, summed)`: each row index of a row-sliced gradient once, in
    increasing order, with the sum of the gradients given for it."""
    rows = np.unique(indices)
    summed = np.zeros((len(rows),) + values.shape[1:], values.dtype)
    np.add.at(summed, np.searchsorted(rows, indices), values)
    return rows, summed


def sm3_sparse_step(
    variable: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray,
    state: State,
    learning_rate: float,
    weight_decay: float | None = None,
    momentum: float = 0.9,
    beta_2: float = 1.0,
    epsilon: float = 1e-30,
    variant: str = "II",
    momentum_dtype: str | None = None,
    block_size: int = 256,
) -> tuple[np.ndarray, State]:
    """The row path of SM3 for a row-sliced gradient (`values[i]` is the
    gradient of row `indices[i]`; repeated rows are summed).

    Only the touched rows change: for them, the dense step with the cover
    reduced to the row accumulator (`accumulator_0`, or the full-size
    `accumulator` of a vector); the other axes' accumulators, and every
    untouched row of the variable, the accumulator and the momentum, are
    left exactly as they were (no decay, no weight decay, no momentum).
    A blockwise int8 momentum is dequantized, the touched rows step, and
    the blocks that hold an element of them are requantized
    (`requantized_row_blocks`); every other block keeps its codes and
    scale.
    """
    rows, summed = summed_rows(indices, values)
    row_name = "accumulator_0" if variable.ndim >= 2 else "accumulator"
    touched = apply_weight_decay(variable[rows], learning_rate, weight_decay)
    with np.errstate(over="ignore"):
        squares = np.square(summed.astype(np.float32))
    nu, new = _sm3_nu_and_accumulators(
        squares, {0: state[row_name][rows]}, variant, beta_2
    )
    quantized = "momentum_scale" in state
    average = None
    momentum_rows = None
    if quantized:
        average = _soma_stored_average(state, "int8", block_size)
        momentum_rows = average[rows]
    elif "momentum" in state:
        momentum_rows = state["momentum"][rows]
    new_rows, new_momentum_rows = _sm3_move(
        touched, summed, nu, momentum_rows, learning_rate, momentum, beta_2, epsilon
    )
    new_variable = variable.copy()
    new_variable[rows] = new_rows
    new_state = {name: array.copy() for name, array in state.items()}
    new_state[row_name][rows] = new[0]
    if quantized:
        average[rows] = new_momentum_rows
        new_state.update(requantized_row_blocks(state, average, rows, block_size))
    elif new_momentum_rows is not None:
        new_state["momentum"][rows] = new_momentum_rows
    return new_variable, new_state


def requantized_row_blocks(state: State, average, rows, block_size: int) -> State:
    """The int8 `momentum` and `momentum_scale` of `state` with every
    block that holds an element of `rows` requantized from the float32
    `average` (the whole momentum, its rows `rows` updated); the other
    blocks keep their codes and scales: the int8 row paths of Soma and
    SM3."""
    codes, scales = quantize_blockwise(average, block_size)
    row_size = int(np.prod(average.shape[1:], dtype=np.int64))
    elements = (rows[:, None] * row_size + np.arange(row_size)).ravel()
    blocks = np.unique(elements // block_size)
    new_codes = state["momentum"].copy().ravel()
    in_blocks = np.isin(np.arange(new_codes.size) // block_size, blocks)
    new_codes[in_blocks] = codes.ravel()[in_blocks]
    new_scales = state["momentum_scale"].copy()
    new_scales[blocks] = scales[blocks]
    return {"momentum": new_codes.reshape(average.shape), "momentum_scale": new_scales}


# ---------------------------------------------------------------------------
# Lazy row steps of the sign optimizers (`lazy_sparse_updates=True`)
# ---------------------------------------------------------------------------


def _lazy_rows_step(
    step,
    variable,
    indices,
    values,
    state,
    learning_rate,
    weight_decay,
    **hyperparameters,
):
    """An element-wise `step` applied to the rows present and nothing else."""
    rows, summed = summed_rows(indices, values)
    new_rows, new_row_state = step(
        variable[rows],
        summed,
        {name: array[rows] for name, array in state.items()},
        learning_rate,
        weight_decay,
        **hyperparameters,
    )
    new_variable = variable.copy()
    new_variable[rows] = new_rows
    new_state = {name: array.copy() for name, array in state.items()}
    for name, array in new_row_state.items():
        new_state[name][rows] = array
    return new_variable, new_state


def soma_sparse_step(
    variable: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray,
    state: State,
    learning_rate: float,
    weight_decay: float | None = None,
    momentum: float = 0.95,
    momentum_dtype: str = "float32",
    block_size: int = 256,
) -> tuple[np.ndarray, State]:
    """Soma with `lazy_sparse_updates=True` on a row-sliced gradient
    (`values[i]` is the gradient of row `indices[i]`; repeated rows are
    summed): `soma_step` on the rows present; every other row of the
    variable and of the momentum is left exactly as it was (no decay of
    the average, no move, no weight decay).

    With `momentum_dtype="int8"` the blocks that hold an element of a row
    present are dequantized, the rows present take the step, and those
    blocks are requantized (other rows in them keep their averages up to
    that rounding); every other block keeps its codes and scale."""
    quantized = momentum_dtype == "int8"
    # An int8 average steps its rows in float32, as a float32 one does.
    row_state = (
        {"momentum": _soma_stored_average(state, "int8", block_size)}
        if quantized
        else state
    )
    new_variable, new_state = _lazy_rows_step(
        soma_step,
        variable,
        indices,
        values,
        row_state,
        learning_rate,
        weight_decay,
        momentum=momentum,
        momentum_dtype="float32" if quantized else momentum_dtype,
    )
    if quantized:
        new_state = requantized_row_blocks(
            state, new_state["momentum"], np.unique(indices), block_size
        )
    return new_variable, new_state


def gradsign_sparse_step(
    variable: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray,
    state: State,
    learning_rate: float,
    weight_decay: float | None = None,
) -> tuple[np.ndarray, State]:
    """GradSign with `lazy_sparse_updates=True` on a row-sliced gradient:
    `gradsign_step` on the rows present (repeated rows summed first);
    every other row of the variable and of the counter is left exactly as
    it was."""
    return _lazy_rows_step(
        gradsign_step, variable, indices, values, state, learning_rate, weight_decay
    )
