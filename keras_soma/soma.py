"""Soma: the sign of momentum."""

from __future__ import annotations

from keras import ops

from keras_soma import _common
from keras_soma._base import KerasSomaOptimizer


def soma_update(value, gradient, momentum_value, learning_rate, momentum):
    """One Soma step as a pure function of tensors.

    The moving average is computed in float32 and stored in the momentum
    dtype (saturating at float16's largest finite value, so huge finite
    gradients keep their sign rather than becoming Inf); the variable
    moves by exactly `learning_rate` times the sign of the stored average,
    in the variable's dtype.
    """
    average = ops.add(
        ops.multiply(ops.cast(momentum_value, "float32"), momentum),
        ops.multiply(ops.cast(gradient, "float32"), 1.0 - momentum),
    )
    average = _common.saturating_cast(average, momentum_value.dtype)
    step = ops.multiply(learning_rate, ops.sign(ops.cast(average, value.dtype)))
    return ops.subtract(value, step), average


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
    `momentum_dtype="bfloat16"`); Adam keeps 8.

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
            `"float32"`, `"bfloat16"` or `"float16"`. It is computed in
            float32 either way. Defaults to `"float32"`.
        skip_nonfinite: Bool. If `True`, a step in which any gradient
            holds NaN or Inf leaves the variables and the state untouched,
            and is counted in `optimizer.skipped_steps`. If `False`, a NaN
            gradient makes the average, and from then on the parameter,
            NaN; an Inf gradient sets the average to +-Inf, so the parameter
            moves in that direction from then on. Defaults to `False`.
        fused: Bool or `None`. `None` runs each variable's update as one
            XLA kernel on TensorFlow where that is safe (see the
            performance page), `False` always runs it op by op. The numbers
            are the same. Defaults to `None`.
        lazy_sparse_updates: Bool. How a row-sliced gradient (the
            `tf.IndexedSlices` an `Embedding` layer gets on TensorFlow;
            JAX's gradients are always dense) is applied. `False` applies
            the dense gradient it stands for: every row's average decays,
            so a row with no gradient this step still moves by
            `learning_rate` times the sign of its (decayed) average.
            `True` reads and writes only the rows present (a row named
            more than once gets the sum of its gradients): the other rows
            keep their weights and averages, weight decay included, and a
            step costs time in proportion to those rows rather than to the
            table. Defaults to `False`.
        {{base_optimizer_keyword_args}}

    References:
        - "A Memory Efficient Optimizer using the Sign of Momentum" (the
          soma paper; fashion-MNIST experiments, decay factor 0.95).
        - [Bernstein et al., 2018, "signSGD: Compressed Optimisation for
          Non-Convex Problems"](https://arxiv.org/abs/1802.04434).
    """

    _slot_attributes = {"momentum": "_momentums"}
    _offers_lazy_sparse_updates = True

    def __init__(
        self,
        learning_rate=2e-4,
        momentum: float = 0.95,
        momentum_dtype: str = "float32",
        skip_nonfinite: bool = False,
        fused=None,
        lazy_sparse_updates: bool = False,
        name="soma",
        **kwargs,
    ):
        momentum = _common.check_number(
            "momentum", momentum, 0.0, 1.0, high_inclusive=False
        )
        momentum_dtype = _common.check_state_dtype("momentum_dtype", momentum_dtype)
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

    def build(self, var_list):
        """Creates one moving average per variable, the variable's shape."""
        if self.built:
            return
        super().build(var_list)
        self._momentums = [
            self.add_slot(variable, "momentum", dtype=self.momentum_dtype)
            for variable in var_list
        ]

    def update_step(self, gradient, variable, learning_rate):
        """Moves `variable` by `learning_rate` times the sign of its
        updated moving average."""
        momentum_value = self._momentums[self._get_variable_index(variable)]
        self.update_with(
            soma_update,
            variable,
            gradient,
            [momentum_value],
            learning_rate,
            hyperparameters=(self.momentum,),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {"momentum": self.momentum, "momentum_dtype": self.momentum_dtype}
        )
        return config
