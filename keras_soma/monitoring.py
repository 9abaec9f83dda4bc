"""Training metrics that come from the optimizer rather than the model."""

from __future__ import annotations

import keras


class SkippedSteps(keras.callbacks.Callback):
    """Reports the steps `skip_nonfinite=True` skipped, as a metric.

    Adds `skipped_steps` (the total so far) to the logs of every batch and
    epoch, so it appears in the progress bar, in `History` and in every
    logger (CSVLogger, TensorBoard) listed after it.

    Example:

    ```python
    model.compile(optimizer=keras_soma.Soma(skip_nonfinite=True), loss="mse")
    history = model.fit(x, y, callbacks=[keras_soma.monitoring.SkippedSteps()])
    history.history["skipped_steps"]
    ```

    Under a `LossScaleOptimizer` (mixed_float16), Keras skips steps with
    non-finite gradients before they reach the inner optimizer; those are
    not counted here.
    """

    def _skipped(self) -> int:
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        counter = getattr(optimizer, "skipped_steps", None)
        if counter is None:
            raise ValueError(
                "SkippedSteps needs a keras_soma optimizer built with "
                f"`skip_nonfinite=True`; the model's optimizer is "
                f"{type(optimizer).__name__} without a skipped-step counter."
            )
        return int(keras.ops.convert_to_numpy(counter))

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None:
            logs["skipped_steps"] = self._skipped()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["skipped_steps"] = self._skipped()
