"""SM3: AdaGrad-like adaptivity with one accumulator per tensor axis."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import ops

from keras_soma import _common, _sparse
from keras_soma._base import KerasSomaOptimizer

VARIANTS = ("I", "II")
# The largest float32. Sums of squares saturate here instead of becoming
# Inf: a gradient element above about 1.8e19 squares past it.
FLOAT32_MAX = 3.4028234663852886e38


def _accumulate(previous, squares, beta_2: float):
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


def _expand(accumulator, axis: int | None, rank: int):
    """An accumulator reshaped to broadcast against the variable: the
    vector of `axis` as `[1, .., dim, .., 1]`; a full-size one as is."""
    if axis is None or rank <= 1:
        return accumulator
    shape = [1] * rank
    shape[axis] = -1
    return ops.reshape(accumulator, shape)


def _reduce_to(values, axis: int | None, rank: int):
    """The maximum of `values` over every axis but `axis` (the value of
    each slice of codimension one), or `values` itself for a full-size
    accumulator."""
    if axis is None:
        return values
    others = tuple(other for other in range(rank) if other != axis)
    if not others:
        return values
    return ops.max(values, axis=others)


def _minimum_over_cover(accumulators, axes, rank: int):
    """The smallest accumulator of every element's slices, broadcast to
    the variable's shape (the accumulator itself if full-size)."""
    expanded = [_expand(value, axis, rank) for value, axis in zip(accumulators, axes)]
    result = expanded[0]
    for value in expanded[1:]:
        result = ops.minimum(result, value)
    return result


def _variant_two_nu(gradient, accumulators, axes, beta_2: float):
    """Variant II's `nu` from a float32 gradient and float32 accumulators."""
    rank = len(gradient.shape)
    return _accumulate(
        _minimum_over_cover(accumulators, axes, rank),
        ops.multiply(gradient, gradient),
        beta_2,
    )


def _preconditioned(gradient, nu, beta_2: float, epsilon: float):
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


def sm3_precondition(
    gradient,
    accumulators: Sequence,
    axes: Sequence[int | None],
    variant: str,
    beta_2: float,
    epsilon: float,
):
    """The preconditioned gradient and the new accumulators, in float32.

    Args:
        gradient: The gradient (any float dtype).
        accumulators: One tensor per entry of `axes`.
        axes: For each accumulator, the axis of `gradient` it runs along
            (it then holds one number per slice of codimension one), or
            `None` for a full-size accumulator (rank 0).
        variant: `"I"` or `"II"`.
        beta_2: 1.0 for sums, < 1 for moving averages.
        epsilon: Added to `nu` under the square root.

    Returns:
        `(update, new_accumulators)`, with `|update| <= update_bound(beta_2)`.
    """
    gradient = ops.cast(gradient, "float32")
    rank = len(gradient.shape)
    accumulators = [ops.cast(value, "float32") for value in accumulators]
    if variant == "II":
        nu = _variant_two_nu(gradient, accumulators, axes, beta_2)
        new_accumulators = [_reduce_to(nu, axis, rank) for axis in axes]
    else:
        squares = ops.multiply(gradient, gradient)
        new_accumulators = [
            _accumulate(value, _reduce_to(squares, axis, rank), beta_2)
            for value, axis in zip(accumulators, axes)
        ]
        nu = _minimum_over_cover(new_accumulators, axes, rank)
    return _preconditioned(gradient, nu, beta_2, epsilon), new_accumulators


def _move(value, update, momentum_value, learning_rate, momentum: float):
    """The momentum (if any) and the variable after a step along `update`.

    Returns `(new_value, new_momentum)`; the momentum is computed in
    float32 and stored in its own dtype, the variable moves in its dtype.
    """
    new_momentum = None
    direction = update
    if momentum_value is not None:
        new_momentum = ops.add(
            ops.multiply(ops.cast(momentum_value, "float32"), momentum),
            ops.multiply(update, 1.0 - momentum),
        )
        new_momentum = ops.cast(new_momentum, momentum_value.dtype)
        direction = new_momentum
    step = ops.multiply(learning_rate, ops.cast(direction, value.dtype))
    return ops.subtract(value, step), new_momentum


def sm3_update(
    value,
    gradient,
    accumulators: Sequence,
    momentum_value,
    learning_rate,
    axes: Sequence[int | None],
    variant: str,
    momentum: float,
    beta_2: float,
    epsilon: float,
):
    """One SM3 step as a pure function of tensors.

    Returns `(new_value, new_accumulators, new_momentum)`; with
    `momentum_value=None` (momentum 0) there is no momentum and
    `new_momentum` is None. The momentum is computed in float32 and stored
    in its own dtype; the variable moves in its dtype.
    """
    update, new_accumulators = sm3_precondition(
        gradient, accumulators, axes, variant, beta_2, epsilon
    )
    new_value, new_momentum = _move(
        value, update, momentum_value, learning_rate, momentum
    )
    return new_value, new_accumulators, new_momentum


# The row-blocked path (CPU only, see `sm3_update_blocked`): about this
# many elements per block, so that a block of the gradient and its
# temporaries stay in a core's cache, and only for variables of at least
# this many elements (smaller ones gain nothing).
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
    the new accumulators computed block of rows by block of rows.

    Variant II's `nu` feeds three things: the element-wise update and two
    or more maxima along different axes. XLA on CPU fuses none of the
    reductions with the element-wise pass, so over whole tensors it keeps
    `nu` as a temporary of the variable's size. Here the element-wise
    update (which needs only the old accumulators) is one pass over whole
    tensors that recomputes `nu` as it goes, and the new accumulators come
    from a loop over blocks of `rows_per_block` rows: each block's `nu` is
    small and stays in cache while its row maxima (final) and its maxima
    along the other axes (a running maximum over the blocks) are taken.
    Every element's `nu` and update go through the same operations as in
    `sm3_update`, and max is exact, so the results agree with it to float32
    rounding (XLA may contract `A + g * g` into one fused multiply-add in
    one form and not the other). A step's temporaries are those of a block.

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
        nu = _variant_two_nu(block, block_accumulators, axes, beta_2)
        first_axis = ops.slice_update(first_axis, [start], _reduce_to(nu, 0, rank))
        # nu >= 0, so 0 is the identity of the running maximum.
        other_axes = [
            ops.maximum(running, _reduce_to(nu, axis, rank))
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

    update = _preconditioned(
        gradient, _variant_two_nu(gradient, accumulators, axes, beta_2), beta_2, epsilon
    )
    new_value, new_momentum = _move(
        value, update, momentum_value, learning_rate, momentum
    )
    return new_value, [first_axis, *other_axes], new_momentum


@_common.register
class SM3(KerasSomaOptimizer):
    """SM3: AdaGrad-quality adaptivity at a few hundredths of a byte per
    parameter.

    AdaGrad divides each gradient element by the root of the sum of its
    squares so far, which needs one number per parameter. SM3 keeps one
    number per *slice* instead: a tensor of rank >= 2 and shape
    `(n_1, ..., n_p)` keeps one accumulator vector per axis (`n_1 + ... +
    n_p` numbers; an `m x n` matrix keeps a row and a column vector,
    `m + n` numbers instead of `m * n`). Each element's sum of squares is
    bounded from above by the smallest accumulator of the slices it lies
    in. Rank 0 and rank 1 variables keep a full-size accumulator
    (diagonal AdaGrad). With `A_r` the accumulator of axis `r`, broadcast
    along the other axes, and `g` the gradient, a step is:

    ```
    variant "II" (default):
        nu   = min_r A_r + g^2
        A_r <- max of nu over every axis but r
    variant "I" (the paper's SM3-I):
        A_r <- A_r + max of g^2 over every axis but r
        nu   = min_r A_r
    both:
        u     = g / sqrt(nu + epsilon),   u = 0 where nu = 0
        m     <- momentum * m + (1 - momentum) * u      (if momentum > 0)
        theta <- theta - learning_rate * m              (u if momentum = 0)
    ```

    With `beta_2 < 1` the sums become exponential moving averages, the
    form the authors recommend for that switch: `A + s` is replaced by
    `beta_2 * A + (1 - beta_2) * s` (variant II: `nu = beta_2 * min_r A_r
    + (1 - beta_2) * g^2`). For a vector or a scalar both variants are
    diagonal AdaGrad. Variant II's `nu` is never larger than variant I's,
    a tighter bound on the true sum of squares. Since `nu >= g^2`
    (`(1 - beta_2) g^2` for averages), `|u| <= 1` (`1 / sqrt(1 - beta_2)`):
    no parameter moves by more than `learning_rate` times that in a step.

    Memory: with `momentum=0`, 4 bytes per accumulator number, about 0.05
    bytes per parameter on the fashion-MNIST MLP and 0.03 on its CNN
    (Adam: 8). `momentum > 0` adds one tensor of the variable's shape and
    dtype (4 bytes per float32 parameter).

    Numbers: squares and accumulators are float32 whatever the variable's
    dtype, and saturate at the largest float32 (about 3.4e38) instead of
    overflowing, so finite gradients never give Inf or NaN. A gradient
    element above about 1.8e19 in magnitude (whose square float32 cannot
    hold) still moves its parameter by the exact step of that update,
    `u` being clipped to the bound above; the saturated accumulators then
    make later steps of the parameters in its slices vanishingly small,
    as the true sums would.

    Sparse gradients: on TensorFlow, a `tf.IndexedSlices` gradient (from
    an `Embedding` layer) takes a row path that reads and writes only the
    touched rows of the variable, of the axis-0 accumulator and of the
    momentum. It is the rule above with the cover reduced to the rows
    (the other axes' accumulators are not used), as in the authors' code;
    rows without a gradient are left alone, momentum, moving average and
    weight decay included. See the SM3 page of the docs.

    Example:

    ```python
    model.compile(
        optimizer=keras_soma.SM3(
            learning_rate=keras_soma.schedules.WarmupCooldown(
                0.07, warmup_steps=500
            )
        ),
        loss="sparse_categorical_crossentropy",
    )
    ```

    Args:
        learning_rate: A float > 0, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            taking no arguments and returning the value to use. SM3 moves a
            parameter by at most about this much per step, so it is 10 to
            100 times Adam's. Defaults to `0.07`, the best of the
            fashion-MNIST sweep on the SM3 docs page.
        momentum: Float in [0, 1), the decay factor of the moving average
            of the preconditioned gradient. 0 keeps no momentum tensor at
            all. Defaults to `0.9`.
        beta_2: Float in (0, 1]. 1 accumulates sums of squared gradients
            (the paper's SM3); below 1 the accumulators are exponential
            moving averages with this decay factor. Defaults to `1.0`.
        epsilon: Float >= 0 added to `nu` under the square root. Defaults
            to `1e-30`.
        variant: `"I"` or `"II"`, the paper's SM3-I or SM3-II (tighter).
            Defaults to `"II"`.
        skip_nonfinite: Bool. If `True`, a step in which any gradient
            holds NaN or Inf leaves the variables and the state untouched,
            and is counted in `optimizer.skipped_steps`. Defaults to
            `False`.
        fused: Bool or `None`. `None` runs each variable's dense update as
            one XLA kernel on TensorFlow where that is safe, `False` always
            runs it op by op. The numbers are the same. Defaults to `None`.
        blocked: Bool or `None`. Variant II's dense update of a variable
            of rank >= 2 and at least 2**18 elements can run block of rows
            by block of rows where XLA compiles it (the fused kernel on
            TensorFlow; JAX without a Keras distribution), which keeps each
            block in cache and the step's temporaries to the size of a
            block. `None` does so on CPU only, `True` on any device,
            `False` never. The numbers are the same. Defaults to `None`.
        {{base_optimizer_keyword_args}}

    References:
        - [Anil et al., 2019, "Memory-Efficient Adaptive
          Optimization"](https://arxiv.org/abs/1901.11150).
    """

    _slot_attributes = {"accumulator": "_accumulators", "momentum": "_momentums"}

    def __init__(
        self,
        learning_rate=0.07,
        momentum: float = 0.9,
        beta_2: float = 1.0,
        epsilon: float = 1e-30,
        variant: str = "II",
        skip_nonfinite: bool = False,
        fused=None,
        blocked=None,
        name="sm3",
        **kwargs,
    ):
        variant = _common.check_choice("variant", variant, VARIANTS)
        momentum = _common.check_number(
            "momentum", momentum, 0.0, 1.0, high_inclusive=False
        )
        beta_2 = _common.check_number("beta_2", beta_2, 0.0, 1.0, low_inclusive=False)
        epsilon = _common.check_number(
            "epsilon", epsilon, 0.0, math.inf, high_inclusive=False
        )
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            skip_nonfinite=skip_nonfinite,
            fused=fused,
            **kwargs,
        )
        self.momentum = momentum
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.variant = variant
        if blocked not in (None, True, False):
            raise ValueError(
                f"Argument `blocked` must be None, True or False. Received: blocked={blocked!r}"
            )
        self.blocked = blocked

    def build(self, var_list):
        """Creates the accumulators (one float32 vector per axis for rank
        >= 2, one full-size float32 tensor for rank 0 and 1) and, if
        `momentum > 0`, one momentum tensor per variable."""
        if self.built:
            return
        super().build(var_list)
        self._accumulators = []
        self._momentums = []
        for variable in var_list:
            if len(variable.shape) >= 2:
                layout = _common.variable_layout(variable)
                accumulators = [
                    self.add_slot(
                        variable,
                        f"accumulator_{axis}",
                        dtype="float32",
                        shape=(dimension,),
                        layout=_common.axis_layout(layout, axis),
                    )
                    for axis, dimension in enumerate(variable.shape)
                ]
            else:
                accumulators = self.add_slot(variable, "accumulator", dtype="float32")
            self._accumulators.append(accumulators)
            self._momentums.append(
                self.add_slot(variable, "momentum") if self.momentum > 0 else None
            )

    def update_step(self, gradient, variable, learning_rate):
        """Preconditions the gradient of `variable` with its accumulators
        and moves it; rows only for a tf.IndexedSlices gradient."""
        index = self._get_variable_index(variable)
        accumulators = self._accumulators[index]
        if not isinstance(accumulators, list):
            accumulators = [accumulators]
        momentum_value = self._momentums[index]
        rank = len(variable.shape)
        if _sparse.is_row_sliced(gradient) and rank >= 1:
            # The row path: the cover shrinks to the rows (axis 0).
            accumulators, axes = accumulators[:1], [0]
            update = self.update_rows_with
        else:
            axes = [None] if rank == 0 else list(range(rank))
            update = self.update_with
        count = len(accumulators)
        rows_per_block = (
            self._rows_per_block(variable) if update == self.update_with else None
        )

        def step(value, gradient, *state_and_learning_rate):
            *state, learning_rate = state_and_learning_rate
            momentum_state = state[count] if momentum_value is not None else None
            if rows_per_block is not None:
                new_value, new_accumulators, new_momentum = sm3_update_blocked(
                    value,
                    gradient,
                    state[:count],
                    momentum_state,
                    learning_rate,
                    rows_per_block=rows_per_block,
                    momentum=self.momentum,
                    beta_2=self.beta_2,
                    epsilon=self.epsilon,
                )
                momentum_part = [] if new_momentum is None else [new_momentum]
                return [new_value, *new_accumulators, *momentum_part]
            new_value, new_accumulators, new_momentum = sm3_update(
                value,
                gradient,
                state[:count],
                momentum_state,
                learning_rate,
                axes=axes,
                variant=self.variant,
                momentum=self.momentum,
                beta_2=self.beta_2,
                epsilon=self.epsilon,
            )
            momentum_part = [] if new_momentum is None else [new_momentum]
            return [new_value, *new_accumulators, *momentum_part]

        momentum_part = [] if momentum_value is None else [momentum_value]
        update(step, variable, gradient, [*accumulators, *momentum_part], learning_rate)

    def _rows_per_block(self, variable) -> int | None:
        """Rows per block where the dense update of `variable` runs block
        by block (`sm3_update_blocked`), else None.

        That path is taken for variant II on CPU where XLA compiles the
        update: the fused kernel on TensorFlow, and JAX without a Keras
        distribution (a loop over blocks of a sharded variable would need
        the sharding's cooperation). On GPU and TPU, where XLA fuses
        reductions itself and a loop of small kernels would be slow, and
        where the update runs op by op, the whole-tensor form is used.
        """
        if self.variant != "II" or self.blocked is False:
            return None
        rows = block_rows(tuple(variable.shape))
        if rows is None:
            return None
        backend = keras.backend.backend()
        if backend == "tensorflow":
            if not self._use_fused_kernel():
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
        if accelerator and self.blocked is not True:
            return None
        return rows

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "variant": self.variant,
                "blocked": self.blocked,
            }
        )
        return config
