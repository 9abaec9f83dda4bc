"""Soma: the sign of momentum."""

from __future__ import annotations

from keras import ops

from keras_soma import _common, _quantize, _sparse
from keras_soma._base import (
    KerasSomaOptimizer,
    _overwritten_with_gradient,
    check_momentum_format,
)


def soma_update(value, gradient, momentum_value, learning_rate, momentum):
    """One Soma step as a pure function of tensors.

    The moving average is computed in float32 and stored in the momentum
    dtype. Both conversions saturate (a float64 gradient beyond float32's
    range, an average beyond bfloat16's or float16's), so huge finite
    gradients keep their sign rather than becoming Inf; the variable
    moves by exactly `learning_rate` times the sign of the stored average,
    in the variable's dtype.
    """
    average = soma_average(gradient, momentum_value, momentum)
    step = ops.multiply(learning_rate, _common.sign(ops.cast(average, value.dtype)))
    return ops.subtract(value, step), average


def soma_average(gradient, momentum_value, momentum):
    """Soma's moving average `momentum * m + (1 - momentum) * g`, computed
    in float32 and stored (saturating) in the momentum's dtype; shared with
    the per-worker momenta of `keras_soma.distribute`."""
    average = ops.add(
        ops.multiply(ops.cast(momentum_value, "float32"), momentum),
        ops.multiply(_common.saturating_cast(gradient, "float32"), 1.0 - momentum),
    )
    return _common.saturating_cast(average, momentum_value.dtype)


def soma_micro_step(
    value, gradient, momentum_value, learning_rate, momentum, steps, starts
):
    """One micro-step of Soma with gradient accumulation, folded into the
    moving average instead of an accumulator.

    At a window's first micro-step (`starts`, a scalar bool) the average
    decays by `momentum`; every micro-step adds `(1 - momentum) / steps`
    times its gradient. After the window's `steps` micro-steps the average
    is `momentum * m + (1 - momentum) * mean(g)`, what `soma_update` makes
    of the window's mean gradient, and the variable returned is moved by
    the sign of it (the caller keeps that move at the window's last
    micro-step only). Conversions saturate as in `soma_update`.
    """
    average = ops.cast(momentum_value, "float32")
    average = ops.where(starts, ops.multiply(average, momentum), average)
    average = ops.add(
        average,
        ops.multiply(
            _common.saturating_cast(gradient, "float32"), (1.0 - momentum) / steps
        ),
    )
    average = _common.saturating_cast(average, momentum_value.dtype)
    step = ops.multiply(learning_rate, _common.sign(ops.cast(average, value.dtype)))
    return ops.subtract(value, step), average


def on_int8_average(step_fn):
    """`step_fn` (`soma_update` or `soma_micro_step`) on an average stored
    as blockwise int8 codes and float32 scales (`keras_soma._quantize`).

    The returned function takes `(value, gradient, codes, scales,
    learning_rate, block_size, *hyperparameters)`: it dequantizes the
    average, lets `step_fn` update it in float32 and move the variable by
    the sign of that float32 average (so a small average that will round
    to the code 0 still moves its parameter this step), and requantizes
    the average with each block's new largest magnitude (the sqrt code,
    nearest rounding). It returns `(new_value, codes, scales)`.
    """

    def step(value, gradient, codes, scales, learning_rate, block_size, *rest):
        average = _quantize.dequantize_blockwise(codes, scales, block_size)
        new_value, average = step_fn(value, gradient, average, learning_rate, *rest)
        return (new_value, *_quantize.quantize_blockwise(average, block_size))

    return step


def _clips(optimizer) -> bool:
    """Whether Keras clips the optimizer's gradients (it ignores values
    <= 0)."""
    return any(
        value is not None and value > 0
        for value in (
            optimizer.clipnorm,
            optimizer.clipvalue,
            optimizer.global_clipnorm,
        )
    )


@_common.register
class Soma(KerasSomaOptimizer):
    """Soma: the sign of a moving average of the gradient.

    Every parameter moves by exactly `learning_rate` per step, in the
    direction of the sign of an exponential moving average of its
    gradient:

    ```
    m     <- momentum * m + (1 - momentum) * g
    theta <- theta - learning_rate * sign(m)        (sign(0) = 0)
    ```

    It trains as fast as Adam while keeping half of Adam's state: one tensor
    per variable, the variable's shape. This is the update of Signum
    (Bernstein et al., 2018) and of Keras's `Lion(beta_1=b, beta_2=b)`.

    Memory: 4 bytes of state per parameter (2 with
    `momentum_dtype="bfloat16"`, about 1.016 with `momentum_dtype="int8"`
    at the default `block_size` of 256); Adam keeps 8.

    With `momentum_dtype="int8"` the average is stored blockwise: int8
    codes, the variable's shape, and one float32 scale per `block_size`
    consecutive elements of the variable flattened in row-major order (a
    partial last block where the size is not a multiple; the
    `momentum_scale` slot, of shape `[ceil(size / block_size)]`). Each
    step dequantizes (`sign(code) * (code / 127) ** 2 * scale`, a square
    law whose smallest nonzero magnitude is `scale / 16129`), updates the
    average in float32, moves the variable by the sign of that float32
    average, and requantizes with each block's new largest magnitude as
    its scale, rounding `127 * sign(m) * sqrt(|m| / scale)` to nearest
    (1 + 4 / block_size bytes per parameter; the Soma docs page has the
    format, why nearest rounding and this code, and the measured
    accuracy).

    Gradient accumulation costs no memory: with
    `gradient_accumulation_steps=N` Soma keeps no gradient accumulator
    (Keras's costs 4 bytes per parameter) but folds each micro-step's
    gradient into the average (decay by `momentum` at a window's first
    micro-step, then add `(1 - momentum) / N` times each gradient) and
    moves at every `N`-th micro-step, as Keras's accumulate-then-step does
    up to float rounding. With `momentum_dtype="int8"` the average is
    requantized at every micro-step, so after a window it carries the
    rounding of each micro-step: its codes may differ from those of
    accumulate-then-step by several steps of the square-root code, and an
    element near zero may end the window with the other sign (its
    parameter then moves the other way). With clipping, which Keras
    applies to the window's mean, Soma keeps Keras's accumulator.

    Example:

    ```python
    model.compile(optimizer=keras_soma.Soma(), loss="mse")
    ```

    Args:
        learning_rate: A float > 0, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            taking no arguments and returning the value to use. The step
            size of every parameter. Defaults to `2e-4`, the paper's value.
        momentum: Float in [0, 1), the decay factor (the paper's gamma) of
            the moving average; 0 gives signSGD. Defaults to `0.95`.
        momentum_dtype: Dtype in which the moving average is stored,
            `"float32"`, `"bfloat16"`, `"float16"` or `"int8"` (blockwise,
            see above). It is computed in float32 either way. Defaults
            to `"float32"`.
        block_size: Int >= 1, elements per float32 scale with
            `momentum_dtype="int8"` (ignored otherwise). Defaults to
            `256`.
        skip_nonfinite: Bool. If `True`, a step in which any gradient
            holds NaN or Inf leaves the variables and the state untouched,
            and is counted in `optimizer.skipped_steps` (it still counts in
            `optimizer.iterations`, so a learning-rate schedule moves on,
            and with `use_ema=True` Keras still moves its average towards
            the unchanged weights). If `False`, a NaN
            gradient makes the average, and from then on the parameter,
            NaN; an Inf gradient sets the average to +-Inf, so the parameter
            moves in that direction from then on. With
            `gradient_accumulation_steps`, a micro-step holding NaN or Inf
            is counted and its gradients count as zeros (the window still
            steps). Defaults to `False`.
        {{fused_arg}}
        lazy_sparse_updates: Bool. How a sparse gradient that names
            whole rows is applied: the `tf.IndexedSlices` an `Embedding`
            layer gets on TensorFlow, or a JAX `BCOO` or torch sparse COO
            tensor with one sparse dimension given to `apply` (Keras's own
            JAX and torch training steps give dense gradients). Other
            sparse gradients are always made dense. `False` applies
            the dense gradient it stands for: every row's average decays,
            so a row with no gradient this step still moves by
            `learning_rate` times the sign of its (decayed) average.
            `True` reads and writes only the rows present (a row named
            more than once gets the sum of its gradients): the other rows
            keep their weights and averages, weight decay included, and a
            step costs time in proportion to those rows rather than to the
            table. With `momentum_dtype="int8"` the blocks that hold an
            element of those rows are dequantized and requantized (reading
            and writing the smallest runs of whole rows that are also runs
            of whole blocks, `lcm(row size, block_size)` elements each);
            other rows in such a block keep their weights, and their
            averages up to the requantization's rounding. Cannot be
            combined with `gradient_accumulation_steps`. Defaults to
            `False`.
        {{base_optimizer_keyword_args}}

    References:
        - "A Memory Efficient Optimizer using the Sign of Momentum" (the
          soma paper; fashion-MNIST experiments, decay factor 0.95).
        - [Bernstein et al., 2018, "signSGD: Compressed Optimisation for
          Non-Convex Problems"](https://arxiv.org/abs/1802.04434).
    """

    _slot_attributes = {"momentum": "_momentums", "momentum_scale": "_momentum_scales"}
    _offers_lazy_sparse_updates = True

    def __init__(
        self,
        learning_rate=2e-4,
        momentum: float = 0.95,
        momentum_dtype: str = "float32",
        block_size: int = 256,
        skip_nonfinite: bool = False,
        fused=None,
        lazy_sparse_updates: bool = False,
        name="soma",
        **kwargs,
    ):
        momentum = _common.check_number(
            "momentum", momentum, 0.0, 1.0, high_inclusive=False
        )
        momentum_dtype, block_size = check_momentum_format(momentum_dtype, block_size)
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            skip_nonfinite=skip_nonfinite,
            fused=fused,
            lazy_sparse_updates=lazy_sparse_updates,
            **kwargs,
        )
        self.momentum = momentum
        self.momentum_dtype = momentum_dtype
        self.block_size = block_size
        # The window length when micro-gradients are folded into the
        # average (gradient accumulation without clipping, which Keras
        # applies to the window's mean and so needs the mean itself).
        self._folded_steps = (
            self.gradient_accumulation_steps
            if self.gradient_accumulation_steps and not _clips(self)
            else None
        )
        # Scalar bools, set while a folded micro-step is applied.
        self._window_starts = None
        self._window_ends = None
        # `(workers, layout_of)` when `keras_soma.distribute.majority_vote`
        # keeps one momentum per data-parallel worker: each momentum is then
        # `[workers, *variable.shape]`, laid out by `layout_of(variable)`.
        self._per_worker_momenta = None

    @property
    def iterations(self):
        # Windows, as Keras counts with accumulation, also while
        # `_backend_apply_gradients` hides `gradient_accumulation_steps`
        # from Keras's step (whose EMA reads this).
        if getattr(self, "_folded_steps", None):
            return ops.floor_divide(self._iterations, self._folded_steps)
        return super().iterations

    def build(self, var_list):
        """Creates one moving average per variable, the variable's shape
        (and, with gradient accumulation and clipping, Keras's gradient
        accumulators)."""
        if self.built:
            return
        if self._folded_steps:
            # Keras would add a gradient accumulator per variable; the
            # average holds the window instead. Variables Keras overwrites
            # with their gradient (float8 scales) keep theirs.
            self.gradient_accumulation_steps = None
            try:
                super().build(var_list)
            finally:
                self.gradient_accumulation_steps = self._folded_steps
            self._accumulated_gradients = [
                self.add_variable_from_reference(variable, name="gradient_accumulator")
                if _overwritten_with_gradient(variable)
                else None
                for variable in var_list
            ]
        else:
            super().build(var_list)
        if self._per_worker_momenta is None:
            self._momentums = [
                self.add_slot(variable, "momentum", dtype=self.momentum_dtype)
                for variable in var_list
            ]
        else:
            workers, layout_of = self._per_worker_momenta
            self._momentums = [
                self.add_slot(
                    variable,
                    "momentum",
                    dtype=self.momentum_dtype,
                    shape=(workers, *variable.shape),
                    layout=layout_of(variable),
                )
                for variable in var_list
            ]
        self._momentum_scales = (
            self.add_block_scales(var_list, self.block_size)
            if self.momentum_dtype == "int8"
            else None
        )

    def _backend_apply_gradients(self, grads, trainable_variables):
        steps = self._folded_steps
        if not steps:
            super()._backend_apply_gradients(grads, trainable_variables)
            return
        if _clips(self):
            raise ValueError(
                "Clipping was set after a Soma with "
                "`gradient_accumulation_steps` was made without it: that Soma "
                "folds each micro-step's gradient into its average and has "
                "no window mean to clip (Keras clips the mean). Pass "
                "`clipnorm`, `clipvalue` or `global_clipnorm` to the "
                "constructor instead (Soma then keeps Keras's gradient "
                f"accumulator); received: clipnorm={self.clipnorm!r}, "
                f"clipvalue={self.clipvalue!r}, "
                f"global_clipnorm={self.global_clipnorm!r}"
            )
        # `_iterations` counts micro-steps and is incremented after this.
        position = ops.mod(self._iterations, steps)
        self._window_starts = ops.equal(position, 0)
        self._window_ends = ops.equal(position, steps - 1)
        # Keras's own step without its accumulator branch: weight decay,
        # `update_step` for every variable, EMA (which reads `iterations`).
        self.gradient_accumulation_steps = None
        try:
            super()._backend_apply_gradients(grads, trainable_variables)
        finally:
            self.gradient_accumulation_steps = steps
            self._window_starts = None
            self._window_ends = None

    def update_step(self, gradient, variable, learning_rate):
        """Moves `variable` by `learning_rate` times the sign of its
        updated moving average (with folded gradient accumulation: folds
        the micro-gradient into the average, and moves at a window's last
        micro-step)."""
        if (
            self.momentum_dtype == "int8"
            and self.lazy_sparse_updates
            and _sparse.is_row_sliced(gradient)
        ):
            index = self._get_variable_index(variable)
            self.update_int8_rows_with(
                soma_update,
                variable,
                gradient,
                [],
                self._momentums[index],
                self._momentum_scales[index],
                self.block_size,
                learning_rate,
                hyperparameters=(self.momentum,),
            )
            return
        index = self._get_variable_index(variable)
        slots = [self._momentums[index]]
        if self._window_starts is None:
            step_fn, hyperparameters = soma_update, (self.momentum,)
        else:
            step_fn = soma_micro_step
            hyperparameters = (self.momentum, self._folded_steps, self._window_starts)
        if self.momentum_dtype == "int8":
            step_fn = on_int8_average(step_fn)
            slots.append(self._momentum_scales[index])
            hyperparameters = (self.block_size, *hyperparameters)
        self.update_with(
            step_fn,
            variable,
            gradient,
            slots,
            learning_rate,
            hyperparameters=hyperparameters,
        )

    def _torch_update(self, grads, trainable_variables, learning_rate):
        from keras_soma import _torch_step

        taken, rest = self._torch_split(
            grads,
            trainable_variables,
            learning_rate,
            rows_apart=self.lazy_sparse_updates,
        )
        if taken is None:
            return rest
        window = {}
        if self._window_starts is not None:
            # Eager: the window's place is known, as Keras's own `cond` on
            # torch knows it.
            window = {
                "starts": bool(self._window_starts),
                "ends": bool(self._window_ends),
                "steps": self._folded_steps,
            }
        if self.momentum_dtype == "int8":
            _torch_step.soma_int8(
                taken.values,
                taken.gradients,
                [self._momentums[index].value for index in taken.indices],
                [self._momentum_scales[index].value for index in taken.indices],
                taken.learning_rate,
                self.momentum,
                self.block_size,
                taken.rates,
                **window,
            )
            return rest
        _torch_step.soma(
            taken.values,
            taken.gradients,
            [self._momentums[index].value for index in taken.indices],
            taken.learning_rate,
            self.momentum,
            taken.rates,
            average_bound=(
                None
                if self.momentum_dtype == "float32"
                else _common.finite_max(self.momentum_dtype)
            ),
            **window,
        )
        return rest

    def _step_computation(self, step_fn, targets, hyperparameters):
        compute = super()._step_computation(step_fn, targets, hyperparameters)
        ends = self._window_ends
        if ends is None:
            return compute

        def micro_step(values, gradient, learning_rate):
            new_value, *state = compute(values, gradient, learning_rate)
            # The variable (weight decay included) moves at a window's last
            # micro-step only; the average takes every micro-step.
            return [ops.where(ends, new_value, values[0]), *state]

        return micro_step

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "momentum_dtype": self.momentum_dtype,
                "block_size": self.block_size,
            }
        )
        return config
