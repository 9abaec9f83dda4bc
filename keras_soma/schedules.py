"""Learning-rate schedules that any Keras optimizer accepts."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_soma import _common


@keras.saving.register_keras_serializable(package="keras_soma")
class WarmupCooldown(keras.optimizers.schedules.LearningRateSchedule):
    """A polynomial warm-up, a constant plateau and an optional linear
    cool-down to 0.

    At optimizer step `t` (`optimizer.iterations`, 0 at the first update):

    ```
    warm-up   = min(1, (t / warmup_steps) ** power)       (1 if warmup_steps = 0)
    cool-down = clip((total_steps - t) / cooldown_steps, 0, 1)
                                                        (1 if cooldown_steps = 0)
    rate(t)   = learning_rate * warm-up * cool-down
    ```

    This is the schedule the SM3 authors advise: a quadratic ramp
    (`power=2`) over about the first 5% of training and no decay after it,
    since adaptive accumulators decay each parameter's step by themselves.
    The optional cool-down takes the rate linearly to 0 over the last
    `cooldown_steps` of `total_steps` (the authors suggest the last 10%),
    which makes the last iterate behave like an average of the last ones at
    no memory cost. The first update (`t = 0`) uses rate 0 when warming up;
    SM3 still fills its accumulators with that step's gradient. The last
    update (`t = total_steps - 1`) uses `learning_rate / cooldown_steps`,
    and from `t = total_steps` on the rate is 0.

    Example:

    ```python
    steps = epochs * steps_per_epoch
    schedule = keras_soma.schedules.WarmupCooldown(
        0.1,
        warmup_steps=steps // 20,
        total_steps=steps,
        cooldown_steps=steps // 10,
    )
    model.compile(optimizer=keras_soma.SM3(learning_rate=schedule), ...)
    ```

    Args:
        learning_rate: Float > 0, the rate of the plateau.
        warmup_steps: Int >= 0, the length of the warm-up; 0 starts at the
            full rate. Defaults to `0`.
        power: Float > 0, the exponent of the ramp: 1 linear, 2
            quadratic. Defaults to `2.0`.
        total_steps: Int >= 1 or `None`, the number of updates of the
            whole run; needed only with a cool-down. Defaults to `None`.
        cooldown_steps: Int >= 0, the length of the linear cool-down at
            the end of `total_steps`; 0 keeps the plateau to the end. The
            warm-up and the cool-down must fit in `total_steps` together.
            Defaults to `0`.
        name: String, the name of the schedule. Defaults to
            `"WarmupCooldown"`.
    """

    def __init__(
        self,
        learning_rate: float,
        warmup_steps: int = 0,
        power: float = 2.0,
        total_steps: int | None = None,
        cooldown_steps: int = 0,
        name: str = "WarmupCooldown",
    ):
        super().__init__()
        self.learning_rate = _common.check_number(
            "learning_rate",
            learning_rate,
            0.0,
            math.inf,
            low_inclusive=False,
            high_inclusive=False,
        )
        self.warmup_steps = _common.check_integer("warmup_steps", warmup_steps, 0)
        self.power = _common.check_number(
            "power", power, 0.0, math.inf, low_inclusive=False, high_inclusive=False
        )
        if total_steps is not None:
            total_steps = _common.check_integer("total_steps", total_steps, 1)
        self.total_steps = total_steps
        self.cooldown_steps = _common.check_integer("cooldown_steps", cooldown_steps, 0)
        if self.cooldown_steps > 0 and total_steps is None:
            raise ValueError(
                "Argument `total_steps` must be an integer >= 1 when "
                "`cooldown_steps` > 0 (the cool-down ends at `total_steps`); "
                f"received: total_steps=None, cooldown_steps={cooldown_steps!r}"
            )
        if total_steps is not None and (
            self.warmup_steps + self.cooldown_steps > total_steps
        ):
            raise ValueError(
                "Arguments `warmup_steps` + `cooldown_steps` must be at most "
                f"`total_steps` (in [0, {total_steps}]); received: "
                f"warmup_steps={warmup_steps!r}, "
                f"cooldown_steps={cooldown_steps!r}, "
                f"total_steps={total_steps!r}"
            )
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        rate = ops.convert_to_tensor(self.learning_rate, "float32")
        if self.warmup_steps > 0:
            ramp = ops.power(ops.divide(step, float(self.warmup_steps)), self.power)
            rate = ops.multiply(rate, ops.minimum(ramp, 1.0))
        if self.cooldown_steps > 0:
            remaining = ops.divide(
                ops.subtract(float(self.total_steps), step),
                float(self.cooldown_steps),
            )
            rate = ops.multiply(rate, ops.clip(remaining, 0.0, 1.0))
        return rate

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "power": self.power,
            "total_steps": self.total_steps,
            "cooldown_steps": self.cooldown_steps,
            "name": self.name,
        }
