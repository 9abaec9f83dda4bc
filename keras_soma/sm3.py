"""SM3: AdaGrad-like adaptivity with one accumulator per tensor axis."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import ops

from keras_soma import _common, _fused, _quantize, _sm3_blocked, _sm3_math, _sparse
from keras_soma._base import KerasSomaOptimizer, check_momentum_format

VARIANTS = ("I", "II")


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
        `(update, new_accumulators)`, with `|update|` at most
        `_sm3_math.update_bound(beta_2)`.
    """
    gradient = ops.cast(gradient, "float32")
    rank = len(gradient.shape)
    accumulators = [ops.cast(value, "float32") for value in accumulators]
    if variant == "II":
        nu = _sm3_math.variant_two_nu(gradient, accumulators, axes, beta_2)
        new_accumulators = [_sm3_math.reduce_to(nu, axis, rank) for axis in axes]
    else:
        squares = ops.multiply(gradient, gradient)
        new_accumulators = [
            _sm3_math.accumulate(
                value, _sm3_math.reduce_to(squares, axis, rank), beta_2
            )
            for value, axis in zip(accumulators, axes)
        ]
        nu = _sm3_math.minimum_over_cover(new_accumulators, axes, rank)
    return _sm3_math.preconditioned(gradient, nu, beta_2, epsilon), new_accumulators


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
    in its own dtype; the variable moves in its dtype. A blockwise int8
    momentum is passed dequantized (float32) and requantized by the caller
    (`SM3.update_step`), so the variable moves by the float32 momentum.
    """
    update, new_accumulators = sm3_precondition(
        gradient, accumulators, axes, variant, beta_2, epsilon
    )
    new_value, new_momentum = _sm3_math.move(
        value, update, momentum_value, learning_rate, momentum
    )
    return new_value, new_accumulators, new_momentum


@_common.register
class SM3(KerasSomaOptimizer):
    """SM3: AdaGrad-like adaptivity from one accumulator per tensor axis.

    A variable of shape `(n_1, ..., n_p)`, `p >= 2`, keeps one float32
    vector `A_r` per axis `r`: `n_1 + ... + n_p` numbers where AdaGrad
    keeps `n_1 * ... * n_p`. A scalar or a vector keeps a full-size one
    (diagonal AdaGrad). With `A_r` broadcast along the other axes and `g`
    the gradient, a step is:

    ```
    variant "II":  nu = min_r A_r + g^2;  A_r <- max of nu over all axes but r
    variant "I":   A_r <- A_r + max of g^2 over all axes but r;  nu = min_r A_r
    u     = g / sqrt(nu + epsilon)               (u = 0 where nu = 0)
    m     <- momentum * m + (1 - momentum) * u   (m = u if momentum = 0)
    theta <- theta - learning_rate * m
    ```

    With `beta_2 < 1` each sum `A + s` is `beta_2 * A + (1 - beta_2) * s`.
    `|u| <= 1` (`1 / sqrt(1 - beta_2)`). Squares and accumulators are
    float32, saturating at its largest value; a sparse gradient of whole
    rows (tf.IndexedSlices, or a BCOO or torch COO tensor with one sparse
    dimension) updates only its rows. Both are described on the SM3 page.

    Memory: 4 bytes per accumulator number, about 0.05 bytes per parameter
    on the fashion-MNIST MLP (Adam: 8); `momentum > 0` adds one tensor of
    the variable's shape, in the variable's dtype (4 bytes per parameter
    for float32 variables) or in `momentum_dtype`: 2 bytes for
    `"bfloat16"`, about 1.016 for `"int8"` at the default `block_size` of
    256 (about 1.07 in all on the MLP, against 4.05 with float32).

    With `momentum_dtype="int8"` the momentum is stored in the format of
    `Soma(momentum_dtype="int8")`: int8 codes of the variable's shape and
    one float32 scale per `block_size` consecutive elements of the
    variable flattened in row-major order (the `momentum_scale` slot,
    `[ceil(size / block_size)]`). Each step dequantizes `m`, updates it in
    float32, moves the variable by `learning_rate` times that float32 `m`,
    and requantizes `m` with each block's new largest magnitude as its
    scale. A row-sliced sparse gradient still takes the row path: a block
    runs across rows, so the blocks that hold an element of the rows
    stepped are requantized (the smallest runs of whole rows that are
    also runs of whole blocks are read and written, `lcm(row size,
    block_size)` elements each); other rows in those blocks keep their
    momentum up to the requantization's rounding, and their weights.

    Args:
        learning_rate: A float > 0, a `LearningRateSchedule`, or a callable
            returning it. A parameter moves by at most about this much per
            step, so it is 10 to 100 times Adam's. Defaults to `0.07`.
        momentum: Float in [0, 1), the decay factor of the moving average
            of `u`; 0 keeps no momentum tensor. Defaults to `0.9`.
        momentum_dtype: Dtype in which the momentum is stored, `None` (the
            variable's dtype), `"float32"`, `"bfloat16"`, `"float16"` or
            `"int8"` (blockwise, see above). It is computed in float32
            either way. No effect at `momentum=0` (no momentum is kept).
            Defaults to `None`.
        block_size: Int >= 1, elements per float32 scale with
            `momentum_dtype="int8"` (ignored otherwise). Defaults to `256`.
        beta_2: Float in (0, 1]. 1 sums the squared gradients (the paper's
            SM3), below 1 averages them. Defaults to `1.0`.
        epsilon: Float >= 0 added to `nu`. Defaults to `1e-30`.
        variant: `"I"` or `"II"` (the tighter bound). Defaults to `"II"`.
        skip_nonfinite: Bool. If `True`, a step with a NaN or Inf gradient
            leaves the variables and the state untouched and is counted in
            `optimizer.skipped_steps` (it still counts in
            `optimizer.iterations`, so a learning-rate schedule moves on,
            and with `use_ema=True` Keras still moves its average towards
            the unchanged weights). Defaults to `False`.
        {{fused_arg}}
        blocked: Bool or `None`. Runs variant II's dense update of variables
            of rank >= 2 and 2**18+ elements block of rows by block of rows:
            same numbers, temporaries of a block. The path exists where XLA
            compiles the update (the fused kernel on TensorFlow; JAX without
            a Keras distribution). `None` takes it there on CPU for the
            variables that hold at least 1/16 of the parameters the
            optimizer was built for (each loop costs compile memory once),
            `True` for every such variable on any device and raises a
            ValueError where the path does not exist (variant "I", other
            backends, `fused=False`), `False` never. Defaults to `None`.
        {{base_optimizer_keyword_args}}

    References:
        - [Anil et al., 2019, "Memory-Efficient Adaptive
          Optimization"](https://arxiv.org/abs/1901.11150).
    """

    _slot_attributes = {
        "accumulator": "_accumulators",
        "momentum": "_momentums",
        "momentum_scale": "_momentum_scales",
    }

    def __init__(
        self,
        learning_rate=0.07,
        momentum: float = 0.9,
        momentum_dtype: str | None = None,
        block_size: int = 256,
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
        momentum_dtype, block_size = check_momentum_format(
            momentum_dtype, block_size, allow_none=True
        )
        beta_2 = _common.check_number("beta_2", beta_2, 0.0, 1.0, low_inclusive=False)
        epsilon = _common.check_number(
            "epsilon", epsilon, 0.0, math.inf, high_inclusive=False
        )
        blocked = _common.check_optional_bool("blocked", blocked)
        if blocked and variant != "II":
            raise _sm3_blocked.refusal(f"variant={variant!r}")
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            skip_nonfinite=skip_nonfinite,
            fused=fused,
            **kwargs,
        )
        self.momentum = momentum
        self.momentum_dtype = momentum_dtype
        self.block_size = block_size
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.variant = variant
        self.blocked = blocked
        # Set by `build`: the elements of the variables it was given.
        self._built_elements = None

    def build(self, var_list):
        """Creates the accumulators (one float32 vector per axis for rank
        >= 2, one full-size float32 tensor for rank 0 and 1) and, if
        `momentum > 0`, one momentum tensor per variable (with
        `momentum_dtype="int8"`, int8 codes and their block scales)."""
        if self.built:
            return
        super().build(var_list)
        # For `blocked=None`: which variables are large enough to block.
        self._built_elements = _sm3_blocked.total_elements(var_list)
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
                self.add_slot(variable, "momentum", dtype=self.momentum_dtype)
                if self.momentum > 0
                else None
            )
        self._momentum_scales = (
            self.add_block_scales(var_list, self.block_size)
            if self._quantized
            else None
        )

    @property
    def _quantized(self) -> bool:
        """Whether the momentum is stored as blockwise int8."""
        return self.momentum > 0 and self.momentum_dtype == "int8"

    def update_step(self, gradient, variable, learning_rate):
        """Preconditions the gradient of `variable` with its accumulators
        and moves it; rows only for a row-sliced gradient (with a
        blockwise int8 momentum, the blocks that hold them)."""
        index = self._get_variable_index(variable)
        accumulators = self._accumulators[index]
        if not isinstance(accumulators, list):
            accumulators = [accumulators]
        momentum_value = self._momentums[index]
        rank = len(variable.shape)
        quantized = self._quantized
        row_path = _sparse.is_row_sliced(gradient) and rank >= 1
        # The int8 row path dequantizes and requantizes around `step`.
        requantizes = quantized and not row_path
        if row_path:
            # The cover shrinks to the rows (axis 0).
            accumulators, axes = accumulators[:1], [0]
            rows_per_block = None
        else:
            axes = [None] if rank == 0 else list(range(rank))
            rows_per_block = self._rows_per_block(variable)
        count = len(accumulators)

        def step(value, gradient, *state_and_learning_rate):
            *state, learning_rate = state_and_learning_rate
            momentum_state = state[count] if momentum_value is not None else None
            if requantizes and rows_per_block is None:
                momentum_state = _quantize.dequantize_blockwise(
                    momentum_state, state[count + 1], self.block_size
                )
            hyperparameters = {
                "momentum": self.momentum,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
            }
            if rows_per_block is None:
                new_value, new_accumulators, new_momentum = sm3_update(
                    value,
                    gradient,
                    state[:count],
                    momentum_state,
                    learning_rate,
                    axes=axes,
                    variant=self.variant,
                    **hyperparameters,
                )
            else:
                new_value, new_accumulators, new_momentum = (
                    _sm3_blocked.sm3_update_blocked(
                        value,
                        gradient,
                        state[:count],
                        momentum_state,
                        learning_rate,
                        rows_per_block=rows_per_block,
                        # An int8 momentum is requantized in the blocks.
                        momentum_scales=state[count + 1] if requantizes else None,
                        block_size=self.block_size if requantizes else None,
                        **hyperparameters,
                    )
                )
            if new_momentum is None:
                momentum_part = []
            elif requantizes and rows_per_block is None:
                momentum_part = _quantize.quantize_blockwise(
                    new_momentum, self.block_size
                )
            elif requantizes:
                momentum_part = new_momentum  # codes and scales
            else:
                momentum_part = [new_momentum]
            return [new_value, *new_accumulators, *momentum_part]

        if row_path and quantized:
            self.update_int8_rows_with(
                step,
                variable,
                gradient,
                accumulators,
                momentum_value,
                self._momentum_scales[index],
                self.block_size,
                learning_rate,
            )
            return
        momentum_part = [] if momentum_value is None else [momentum_value]
        if quantized:
            momentum_part.append(self._momentum_scales[index])
        update = self.update_rows_with if row_path else self.update_with
        update(step, variable, gradient, [*accumulators, *momentum_part], learning_rate)

    def _torch_step_missing(self) -> str | None:
        """Why the multi-tensor torch step (`_torch_step.sm3`) cannot make
        this optimizer's update, or None where it can. It keeps the
        momentum in place, float32 (a float32 variable's `None`) or
        blockwise int8."""
        if self.variant != "II":
            return f"variant={self.variant!r} (it takes variant 'II')"
        if self.epsilon == 0:
            return "epsilon=0 (it takes epsilon > 0)"
        if self.momentum > 0 and self.momentum_dtype not in (None, "float32", "int8"):
            return (
                f"momentum_dtype={self.momentum_dtype!r} (it takes a float32 "
                "or int8 momentum, or momentum=0)"
            )
        return None

    def _torch_update(self, grads, trainable_variables, learning_rate):
        if self._torch_step_missing() is not None:
            return super()._torch_update(grads, trainable_variables, learning_rate)
        from keras_soma import _torch_step

        taken, rest = self._torch_split(
            grads, trainable_variables, learning_rate, rows_apart=True
        )
        if taken is None:
            return rest
        accumulators = []
        for index in taken.indices:
            slots = self._accumulators[index]
            slots = slots if isinstance(slots, list) else [slots]
            accumulators.append([slot.value for slot in slots])
        momenta = []
        for index in taken.indices:
            momentum = self._momentums[index]
            if momentum is not None and self._quantized:
                momentum = (momentum.value, self._momentum_scales[index].value)
            elif momentum is not None:
                momentum = momentum.value
            momenta.append(momentum)
        left = _torch_step.sm3(
            taken.values,
            taken.gradients,
            accumulators,
            momenta,
            taken.learning_rate,
            self.momentum,
            self.beta_2,
            self.epsilon,
            taken.rates,
            block_size=self.block_size if self._quantized else None,
        )
        return rest + [(taken.gradients[i], taken.variables[i]) for i in left]

    def _rows_per_block(self, variable) -> int | None:
        """Rows per block where the dense update of `variable` runs block
        by block (`_sm3_blocked.sm3_update_blocked`), else None."""
        shape = tuple(variable.shape)
        multiple = 1
        if self._quantized and len(shape) >= 2:
            # Each block of rows requantizes whole blocks of its own.
            multiple = _quantize.row_groups(shape, self.block_size)[0]
        return _sm3_blocked.rows_per_block(
            shape,
            self.variant,
            self.blocked,
            self.fused,
            multiple,
            total_elements=self._built_elements,
        )

    def _check_requested_paths(self, in_update: bool) -> None:
        super()._check_requested_paths(in_update)
        if self.fused is True and keras.backend.backend() == "torch":
            missing = self._torch_step_missing()
            if missing is not None:
                raise _fused.refusal(
                    "SM3's multi-tensor torch step does not take "
                    f"{missing}; under torch.compile the `keras.ops` update "
                    "is compiled with `fused=None` as well"
                )
        if self.blocked:
            reason = _sm3_blocked.unavailable_reason(
                self.variant, self.fused, in_update
            )
            if reason is not None:
                raise _sm3_blocked.refusal(reason)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "momentum_dtype": self.momentum_dtype,
                "block_size": self.block_size,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "variant": self.variant,
                "blocked": self.blocked,
            }
        )
        return config
