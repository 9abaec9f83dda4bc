"""GradSign: one byte of state per parameter."""

from __future__ import annotations

import keras
from keras import ops

from keras_soma import _common
from keras_soma._base import KerasSomaOptimizer

# The counter's fixed-point scale: c / 64 is the averaged sign.
COUNTER_SCALE = 64
# Reachable counter values from a zero start (proved in tests): the map
# c -> c - floor((c + 4) / 8) + 8 * s is monotone in c, so its extremes
# are reached by repeating one sign: +60 for s = +1, -61 for s = -1.
COUNTER_MAX = 60
COUNTER_MIN = -61


def gradsign_update(value, gradient, counter, learning_rate):
    """One GradSign step as a pure function of tensors.

    The counter is decayed with time scale 8 (integer arithmetic, in
    int8), the gradient's sign is added
    with weight 8, and the variable moves by `learning_rate * c / 64`.
    """
    # Computed in int8 itself: every intermediate of a reachable counter
    # (c + 4 <= 64, the result within [-61, 60]) fits, and int8 arithmetic
    # is what vectorizes best in XLA. floor((c + 4) / 8) is an arithmetic
    # shift: the same for negative c in two's complement, and no division.
    # On torch in int32 (the same numbers): torch.compile's CPU code does
    # int8 shifts and products lane by lane, which made the compiled step
    # about 12 times slower than in int32.
    work = "int32" if keras.backend.backend() == "torch" else "int8"
    count = ops.cast(counter, work)
    count = ops.subtract(count, ops.right_shift(ops.add(count, 4), 3))
    count = ops.add(count, ops.multiply(_common.nan_safe_sign(gradient, work), 8))
    averaged_sign = ops.divide(ops.cast(count, value.dtype), COUNTER_SCALE)
    return (
        ops.subtract(value, ops.multiply(learning_rate, averaged_sign)),
        ops.cast(count, "int8"),
    )


@_common.register
class GradSign(KerasSomaOptimizer):
    """GradSign: an int8 moving average of the gradient's sign.

    Each parameter keeps one signed byte `c`, a quantized exponential moving
    average of the sign of its gradient with a time scale of 8 steps:

    ```
    c     <- c - floor((c + 4) / 8)        (decay by 1/8, rounded)
    c     <- c + 8 * sign(g)               (sign(0) = 0)
    theta <- theta - learning_rate * c / 64
    ```

    `c / 64` lies in [-61/64, 60/64]: a parameter whose gradient keeps its
    sign moves by about `learning_rate` per step, one whose gradient's sign
    flips back and forth barely moves.

    Differences from the original snippet, on purpose: `c` starts at 0
    rather than at random, and a zero gradient adds 0 rather than -8, so a
    parameter whose gradient is always zero never moves from a fresh state.
    A NaN gradient element counts as zero and an Inf one as its sign, so
    non-finite gradients cannot corrupt the state or the variable.

    Memory: 1 byte of state per parameter (Adam keeps 8, Soma 4).

    Example:

    ```python
    model.compile(optimizer=keras_soma.GradSign(), loss="mse")
    ```

    Args:
        learning_rate: A float > 0, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            taking no arguments and returning the value to use. A parameter
            moves at most about this much per step. Defaults to `3e-4`,
            the best of the fashion-MNIST sweep on the GradSign docs page.
        skip_nonfinite: Bool. If `True`, a step in which any gradient
            holds NaN or Inf leaves the variables and the state untouched,
            and is counted in `optimizer.skipped_steps` (it still counts in
            `optimizer.iterations`, so a learning-rate schedule moves on,
            and with `use_ema=True` Keras still moves its average towards
            the unchanged weights). Defaults to `False`.
        {{fused_arg}}
        lazy_sparse_updates: Bool. How a sparse gradient that names
            whole rows is applied: the `tf.IndexedSlices` an `Embedding`
            layer gets on TensorFlow, or a JAX `BCOO` or torch sparse COO
            tensor with one sparse dimension given to `apply` (Keras's own
            JAX and torch training steps give dense gradients). Other
            sparse gradients are always made dense. `False` applies
            the dense gradient it stands for: every row's counter decays
            towards 0, so a row with no gradient this step still moves by
            `learning_rate * c / 64` with its decayed counter. `True` reads
            and writes only the rows present (a row named more than once
            gets the sum of its gradients): the other rows keep their
            weights and counters, weight decay included, and a step costs
            time in proportion to those rows rather than to the table.
            Cannot be combined with `gradient_accumulation_steps`.
            Defaults to `False`.
        {{base_optimizer_keyword_args}}

    References:
        - "A Memory Efficient Optimizer using the Sign of Momentum" (the
          soma paper, whose sign-counter snippet this refines).
        - [Bernstein et al., 2018, "signSGD: Compressed Optimisation for
          Non-Convex Problems"](https://arxiv.org/abs/1802.04434).
    """

    _slot_attributes = {"sign_counter": "_sign_counters"}
    _offers_lazy_sparse_updates = True

    def __init__(
        self,
        learning_rate=3e-4,
        skip_nonfinite: bool = False,
        fused=None,
        lazy_sparse_updates: bool = False,
        name="gradsign",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            skip_nonfinite=skip_nonfinite,
            fused=fused,
            lazy_sparse_updates=lazy_sparse_updates,
            **kwargs,
        )

    def build(self, var_list):
        """Creates one int8 counter per parameter."""
        if self.built:
            return
        super().build(var_list)
        self._sign_counters = [
            self.add_slot(variable, "sign_counter", dtype="int8")
            for variable in var_list
        ]

    def update_step(self, gradient, variable, learning_rate):
        """Updates the counter of `variable` and moves it by
        `learning_rate * c / 64`."""
        counter = self._sign_counters[self._get_variable_index(variable)]
        self.update_with(gradsign_update, variable, gradient, [counter], learning_rate)

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
        _torch_step.gradsign(
            taken.values,
            taken.gradients,
            [self._sign_counters[index].value for index in taken.indices],
            taken.learning_rate,
            taken.rates,
        )
        return rest
