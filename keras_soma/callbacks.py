"""Callbacks: `PolyakAveraging`, averaged weights for evaluation and serving."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import keras
import numpy as np
from keras import ops

from keras_soma import _common

# The model attribute the averaging state is mounted on; it is the path of
# the state in the model's weight files (`<attribute>/vars/...`).
STATE_ATTRIBUTE = "_keras_soma_polyak_averaging"


class PolyakAveraging(keras.callbacks.Callback):
    """Keeps an average of the weights for evaluation and serving.

    Works with any optimizer (keras_soma's or Keras's). After each
    optimizer step the callback updates a running average of every
    trainable weight `w`:

    ```
    exponential (decay = d):           avg <- d * avg + (1 - d) * w
    dynamic_decay=True:                d = min(decay, (1 + t) / (10 + t))
    uniform (decay=None):              avg <- mean of the weights after each
                                       optimizer step since start_step
                                       (d = t / (t + 1))
    ```

    where `t` is the number of averaging updates made so far. The average
    starts as the weights at the step where averaging starts: before the
    first step of `fit` when `start_step=0`, otherwise after optimizer step
    `start_step` (the optimizer's `iterations`, which counts across `fit`
    calls and is restored from checkpoints). The uniform average does not
    include those starting weights: it is the Polyak-Ruppert mean of the
    weights after the steps that follow.

    One call updates all the averages per step: a `tf.function` on
    TensorFlow, a `jax.jit` function on JAX, a multi-tensor
    (`torch._foreach_lerp_`) operation on PyTorch.

    Example:

    ```python
    averaging = keras_soma.PolyakAveraging(decay=0.999)
    model.fit(x, y, validation_data=(x_val, y_val), callbacks=[averaging])
    # Validation during fit ran on the averages.
    with averaging.averaged():
        model.evaluate(x_test, y_test)
        model.export("served_model")  # a SavedModel serving the averages
    ```

    Only trainable weights are averaged (re-estimate BatchNormalization
    statistics inside `averaged()` if needed). The callback checks once
    before the first step of each `fit` and after every call of the train
    function; with `steps_per_execution = n`, it sees only the weights after
    steps `n, 2n, ...`. Memory: one copy of the trainable weights plus two
    integer scalars.

    **Saving.** While the callback is attached (from `fit` on, or after
    `set_model(model)`), its state is in the model's weight files, so
    `model.save_weights`, `model.save`, `ModelCheckpoint` and
    `BackupAndRestore` save and restore the averages with the weights and
    the optimizer state. A model carries the state of one `PolyakAveraging`
    at a time: the one attached last. Under `tf.distribute` each replica
    updates its own mirrored copy; with the Keras distribution API each
    average takes its weight's layout. See docs/callbacks.md for details.

    Args:
        decay: Float in (0, 1), the decay `d` of the exponential average,
            or `None` for the uniform (Polyak-Ruppert) average. Defaults to
            `0.999`.
        dynamic_decay: Bool. If `True`, the decay of update `t` is
            `min(decay, (1 + t) / (10 + t))`, so early weights are forgotten
            quickly. Needs a float `decay`. Defaults to `False`.
        start_step: Int >= 0, the optimizer step (the optimizer's
            `iterations`) after which averaging starts. Defaults to `0`:
            averaging starts from the weights `fit` begins with.
        update_every: Int >= 1. Update the average once every this many
            optimizer steps. Defaults to `1`.
        evaluate_with_average: Bool. If `True`, evaluation run with this
            callback (the validation of `fit`, or `model.evaluate(...,
            callbacks=[averaging])`) uses the averages once averaging has
            started, and training resumes on the raw weights afterwards.
            Defaults to `True`.
        at_train_end: `"keep"` leaves the raw weights in the model when
            `fit` ends; `"apply"` writes the averages into the model (as
            `apply()`). Defaults to `"keep"`.
    """

    def __init__(
        self,
        decay: float | None = 0.999,
        dynamic_decay: bool = False,
        start_step: int = 0,
        update_every: int = 1,
        evaluate_with_average: bool = True,
        at_train_end: str = "keep",
    ):
        super().__init__()
        if decay is not None:
            try:
                decay = _common.check_number("decay", decay, 0.0, 1.0, False, False)
            except ValueError:
                raise ValueError(
                    "Argument `decay` must be a number in (0, 1), or None for "
                    f"the uniform average; received: decay={decay!r}"
                ) from None
        if _common.check_bool("dynamic_decay", dynamic_decay) and decay is None:
            raise ValueError(
                "Argument `dynamic_decay=True` needs a number `decay` in "
                "(0, 1) to cap the decay; received: decay=None"
            )
        self.decay = decay
        self.dynamic_decay = dynamic_decay
        self.start_step = _common.check_integer("start_step", start_step, 0)
        self.update_every = _common.check_integer("update_every", update_every, 1)
        self.evaluate_with_average = _common.check_bool(
            "evaluate_with_average", evaluate_with_average
        )
        self.at_train_end = _common.check_choice(
            "at_train_end", at_train_end, ("keep", "apply")
        )
        self._state: _AveragingState | None = None
        self._update_function = None
        self._update_key = ()
        self._check_before_next_batch = False
        self._swapped_for_test = False

    @property
    def started(self) -> bool:
        """Whether averaging has started (the averages hold values)."""
        return self.last_step >= 0

    @property
    def num_updates(self) -> int:
        """The number of averaging updates made so far (`t`)."""
        return 0 if self._state is None else _common.to_int(self._state.num_updates)

    @property
    def last_step(self) -> int:
        """The optimizer step of the latest update, or of the start; -1
        before averaging starts."""
        return -1 if self._state is None else _common.to_int(self._state.last_step)

    @property
    def averages(self) -> list[keras.Variable]:
        """The Keras variables holding the averages.

        Index-aligned with `model.trainable_variables`. Inside `averaged()`
        the model holds the averages and these variables the raw weights.
        """
        return list(self._require("averages", started=False).averages)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[keras.Model]:
        """A context in which the model's trainable weights are the averages.

        On leaving it, the raw weights are back, bit for bit. The weights
        are swapped with the averages, so no copy is kept.

        Yields:
            The model.

        Raises:
            ValueError: If averaging has not started yet, or inside
                another `averaged()`.
        """
        if self._require("averaged()").swapped:
            raise ValueError(
                "The model already holds the averages: `averaged()` cannot be nested."
            )
        self._swap()
        try:
            yield self.model
        finally:
            self._swap()

    def apply(self) -> None:
        """Writes the averages into the model's trainable weights for good.

        The raw weights are lost; the averaging state is kept, so further
        training goes on averaging.

        Raises:
            ValueError: If averaging has not started yet, or inside
                `averaged()`.
        """
        state = self._require("apply()")
        if state.swapped:
            raise ValueError(
                "`apply()` cannot be called inside `averaged()`: the model "
                "already holds the averages there."
            )
        with _strategy_scope(self.model):  # On JAX, `self.model` syncs fit's state.
            for weight, average in zip(state.model_variables, state.averages):
                weight.assign(ops.convert_to_tensor(average))

    # Keras callback hooks.

    def set_model(self, model):
        super().set_model(model)
        if getattr(model, "built", False):
            self._attach(model)

    def on_train_begin(self, logs=None):
        self._attach(self.model)
        if self._state.swapped:
            # A previous fit stopped inside an evaluation on the averages.
            warnings.warn(
                "PolyakAveraging: the model still held the averages from an "
                "interrupted evaluation; the raw weights were put back.",
                stacklevel=2,
            )
            self._swap()
        self._swapped_for_test = False
        # The first check waits until every callback's on_train_begin has run
        # (BackupAndRestore loads its checkpoint there).
        self._check_before_next_batch = True

    def on_train_batch_begin(self, batch, logs=None):
        if self._check_before_next_batch:
            self._check_before_next_batch = False
            self._update()

    def on_train_batch_end(self, batch, logs=None):
        self._update()

    def on_test_begin(self, logs=None):
        state = self._state
        if self.evaluate_with_average and self.started and not state.swapped:
            self._swap()
            self._swapped_for_test = True

    def on_test_end(self, logs=None):
        if self._swapped_for_test:
            self._swapped_for_test = False
            self._swap()

    def on_train_end(self, logs=None):
        if self.at_train_end != "apply":
            return
        if not self.started:
            warnings.warn(
                "PolyakAveraging(at_train_end='apply'): averaging never "
                f"started (start_step={self.start_step}), so the model keeps "
                "its trained weights.",
                stacklevel=2,
            )
            return
        self.apply()

    # Internals.

    def _attach(self, model) -> None:
        """Mounts this callback's state on `model`, new unless the state
        already averages the model's trainable variables."""
        variables = model.trainable_variables
        state = self._state
        if state is not None and not _same(state.model_variables, variables):
            if getattr(model, STATE_ATTRIBUTE, None) is state:
                warnings.warn(
                    "PolyakAveraging: the model's trainable variables "
                    "changed; averaging starts again.",
                    stacklevel=2,
                )
            state = None
        if state is None:
            with _strategy_scope(model):
                self._state = state = _AveragingState(variables)
        # Bypasses Keras's attribute tracking on purpose: the state must be
        # in the model's weight files, but not one of its layers or weights.
        object.__setattr__(model, STATE_ATTRIBUTE, state)

    def _require(self, what: str, started: bool = True) -> _AveragingState:
        """The state, or a ValueError saying why `what` cannot be used."""
        if self._state is None:
            raise ValueError(
                f"PolyakAveraging has no averages yet, so `{what}` cannot be "
                "used: train with `model.fit(..., callbacks=[averaging])` "
                "first (or attach it with `averaging.set_model(model)` and "
                "load saved weights)."
            )
        if started and not self.started:
            optimizer = getattr(self.model, "optimizer", None)
            steps = 0 if optimizer is None else _common.to_int(optimizer.iterations)
            raise ValueError(
                f"PolyakAveraging has not started averaging yet, so `{what}` "
                f"cannot be used: it starts at optimizer step "
                f"start_step={self.start_step} and the optimizer has taken "
                f"{steps} steps."
            )
        return self._state

    def _swap(self) -> None:
        """Exchanges the model's trainable weights with the averages."""
        state = self._state
        with _strategy_scope(self.model):  # On JAX, `self.model` syncs fit's state.
            raw = [_snapshot(weight) for weight in state.model_variables]
            for weight, average in zip(state.model_variables, state.averages):
                weight.assign(ops.convert_to_tensor(average))
            for average, value in zip(state.averages, raw):
                average.assign(value)
        state.swapped = not state.swapped

    def _update(self) -> None:
        model = self.model  # On JAX, this syncs fit's state into the weights.
        key = (self._state, model.optimizer)
        if not _same(key, self._update_key):
            make = _UPDATE_MAKERS.get(keras.backend.backend(), _functional_update)
            optimizer = model.optimizer

            # Read at every check: with `gradient_accumulation_steps`, Keras's
            # `iterations` is computed from the micro-step counter when read.
            def read_iteration():
                return ops.convert_to_tensor(optimizer.iterations)

            self._update_function = make(self._state, read_iteration, self._plan)
            self._update_key = key
        with _strategy_scope(model):
            self._update_function()

    def _plan(self, iteration, last_step, num_updates):
        """What a check does, computed from tensors on the device.

        Returns:
            `(active, take, new_num_updates)`: whether the averages change
            now; the new average is `(1 - take) * average + take * weight`
            (`take = 1` when averaging starts); the new count.
        """
        last_step = ops.convert_to_tensor(last_step)
        iteration = ops.cast(iteration, last_step.dtype)
        started = ops.greater_equal(last_step, 0)
        starting = ops.logical_and(
            ops.logical_not(started), ops.greater_equal(iteration, self.start_step)
        )
        due = ops.logical_and(
            started,
            ops.greater_equal(ops.subtract(iteration, last_step), self.update_every),
        )
        updates = ops.cast(num_updates, "float32")
        if self.decay is None:
            take = ops.divide(1.0, ops.add(updates, 1.0))
        else:
            decay = ops.convert_to_tensor(self.decay, "float32")
            if self.dynamic_decay:
                decay = ops.minimum(
                    decay, ops.divide(ops.add(updates, 1.0), ops.add(updates, 10.0))
                )
            take = ops.subtract(1.0, decay)
        take = ops.where(starting, 1.0, take)
        num_updates = ops.add(num_updates, ops.cast(due, last_step.dtype))
        return ops.logical_or(starting, due), take, num_updates


class _AveragingState(keras.layers.Layer):
    """The averages and their counters: a Keras layer only so that Keras's
    weight saving visits it as an attribute of the model; never called."""

    def __init__(self, model_variables):
        super().__init__(name="polyak_averaging", trainable=False)
        # Each average takes its weight's sharding layout (the Keras
        # distribution API on JAX); under tf.distribute the strategy scope
        # mirrors it.
        self.averages = [
            keras.Variable(
                initializer="zeros",
                shape=tuple(variable.shape),
                dtype=variable.dtype,
                trainable=False,
                autocast=False,
                name=f"average_{index}",
                **_common.layout_keyword(
                    keras.Variable, _common.variable_layout(variable)
                ),
            )
            for index, variable in enumerate(model_variables)
        ]
        # "int" is int64, or int32 where JAX runs without 64-bit types (the
        # dtype of the optimizer's own step counter).
        self.num_updates, self.last_step = (
            self.add_weight(
                shape=(),
                dtype="int",
                initializer=keras.initializers.Constant(value),
                trainable=False,
                autocast=False,
                name=name,
            )
            for name, value in (("num_updates", 0), ("last_step", -1))
        )
        self.built = True
        # True while the model holds the averages and `averages` the raw
        # weights (inside `averaged()` or an evaluation).
        self.swapped = False
        # Untracked, so that the model's variables are not this layer's own.
        object.__setattr__(self, "model_variables", list(model_variables))

    def save_own_variables(self, store):
        # The true averages, also while they are swapped into the model.
        averages = self.model_variables if self.swapped else self.averages
        for index, average in enumerate(averages):
            store[f"average_{index}"] = np.array(ops.convert_to_numpy(average))
        store["num_updates"] = np.int64(_common.to_int(self.num_updates))
        store["last_step"] = np.int64(_common.to_int(self.last_step))

    def load_own_variables(self, store):
        keys = list(store.keys())  # Keras's stores have no iteration.
        if not keys:  # A file without averaging state: averaging restarts.
            self.swapped = False
            self.num_updates.assign(0)
            self.last_step.assign(-1)
            return
        count = sum(str(key).startswith("average_") for key in keys)
        if count != len(self.averages):
            raise ValueError(
                f"The averaging state holds {count} averages, but the model "
                f"has {len(self.averages)} trainable variables."
            )
        values = [np.asarray(store[f"average_{index}"]) for index in range(count)]
        num_updates = int(np.asarray(store["num_updates"]))
        last_step = int(np.asarray(store["last_step"]))
        # Every shape is checked before anything is assigned.
        for index, (value, average, weight) in enumerate(
            zip(values, self.averages, self.model_variables)
        ):
            if value.shape != tuple(average.shape):
                raise ValueError(
                    f"Average {index} has shape {value.shape}, but trainable "
                    f"variable {_common.variable_path(weight)!r} has shape "
                    f"{tuple(average.shape)}; nothing was loaded."
                )
        # The model's weights and the averages load from the same file, so
        # nothing is swapped afterwards.
        self.swapped = False
        for average, value in zip(self.averages, values):
            average.assign(value)
        self.num_updates.assign(num_updates)
        self.last_step.assign(last_step)


# The update of all averages, one compiled or multi-tensor call per check.
# Each maker takes the state, a function that reads the optimizer's step
# count and the callback's `_plan`, and returns `update()`.


def _blend(average, weight, take):
    """`(1 - take) * average + take * weight`, computed in float32 (float64
    for float64 weights) and returned in the average's dtype."""
    dtype = keras.backend.standardize_dtype(average.dtype)
    compute_dtype = "float64" if dtype == "float64" else "float32"
    take = ops.cast(take, compute_dtype)
    result = ops.add(
        ops.multiply(ops.subtract(1.0, take), ops.cast(average, compute_dtype)),
        ops.multiply(take, ops.cast(weight, compute_dtype)),
    )
    return ops.cast(result, dtype)


def _tensorflow_update(state, read_iteration, plan):
    import tensorflow as tf

    def blend_into(average, weight, take):
        return average.assign(_blend(average, weight, take))

    @tf.function
    def update():
        iteration = read_iteration()
        active, take, num_updates = plan(iteration, state.last_step, state.num_updates)
        if active:  # A tf.cond (AutoGraph).
            # Under a tf.distribute strategy each replica blends its own
            # copies (no broadcast of the new averages).
            extended = tf.distribute.get_strategy().extended
            for average, weight in zip(state.averages, state.model_variables):
                extended.update(
                    average.value, blend_into, args=(weight.value, take), group=False
                )
            state.last_step.assign(ops.cast(iteration, state.last_step.dtype))
            state.num_updates.assign(num_updates)

    return update


def _torch_update(state, read_iteration, plan):
    import torch

    def update():
        with torch.no_grad():
            iteration = read_iteration()
            active, take, num_updates = plan(
                iteration, state.last_step.value, state.num_updates.value
            )
            # Host reads of two scalars, as fit makes for its logs each step.
            if not bool(active):
                return
            # `(1 - take) * average + take * weight` is a lerp; one
            # multi-tensor call for all averages, computed in float32 for
            # lower-precision dtypes, exact at take = 1.
            torch._foreach_lerp_(
                [average.value for average in state.averages],
                [weight.value for weight in state.model_variables],
                float(take),
            )
            state.last_step.assign(ops.cast(iteration, state.last_step.dtype))
            state.num_updates.assign(num_updates)

    return update


def _functional_update(state, read_iteration, plan):
    """A pure function of the values (`jax.jit`-compiled on JAX), whose
    results are assigned back."""

    def pure_update(iteration, last_step, num_updates, averages, weights):
        active, take, new_num_updates = plan(iteration, last_step, num_updates)
        return ops.cond(
            active,
            lambda: (
                ops.cast(iteration, last_step.dtype),
                new_num_updates,
                [_blend(a, w, take) for a, w in zip(averages, weights)],
            ),
            lambda: (last_step, num_updates, list(averages)),
        )

    if keras.backend.backend() == "jax":
        import jax

        pure_update = jax.jit(pure_update)

    def update():
        last_step, num_updates, averages = pure_update(
            read_iteration(),
            state.last_step.value,
            state.num_updates.value,
            [average.value for average in state.averages],
            [weight.value for weight in state.model_variables],
        )
        state.last_step.assign(last_step)
        state.num_updates.assign(num_updates)
        for variable, value in zip(state.averages, averages):
            variable.assign(value)

    return update


_UPDATE_MAKERS = {"tensorflow": _tensorflow_update, "torch": _torch_update}


def _strategy_scope(model):
    """The model's tf.distribute strategy scope on TensorFlow, else a null
    context."""
    strategy = getattr(model, "distribute_strategy", None)
    if keras.backend.backend() != "tensorflow" or strategy is None:
        return contextlib.nullcontext()
    return strategy.scope()


def _snapshot(variable):
    """The variable's current value, left intact by later assignments."""
    if keras.backend.backend() == "jax":
        return variable.value  # JAX arrays are immutable: no copy needed.
    # Converting the variable itself can hand back the variable, which the
    # next assignment would overwrite.
    return ops.copy(variable)


def _same(first, second) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second))
