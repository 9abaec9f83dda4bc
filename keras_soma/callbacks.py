"""Callbacks: `PolyakAveraging`, averaged weights for evaluation and serving.

The averaging state (one average per trainable weight, the number of
averaging updates and the optimizer step of the latest one) lives in Keras
variables held by a small private layer that the callback mounts on the
model. Keras saves every saveable attribute of a model, so
`model.save_weights`, `model.save`, `ModelCheckpoint` and `BackupAndRestore`
carry the averaging state with the weights and the optimizer state, and
restore it with them. The layer is mounted without Keras's attribute
tracking, so it is not one of `model.layers` or `model.weights`: the model's
summary, its config, what `model.export` serves and what `load_model`
rebuilds are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_soma import _common
from keras_soma._reference import numpy_dtype

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

    The update of all averages is one compiled function per step (a
    `tf.function` on TensorFlow, a `jax.jit` function on JAX).

    Example:

    ```python
    averaging = keras_soma.PolyakAveraging(decay=0.999)
    model.fit(x, y, validation_data=(x_val, y_val), callbacks=[averaging])
    # Validation during fit ran on the averages.
    with averaging.averaged():
        model.evaluate(x_test, y_test)
        model.export("served_model")  # a SavedModel serving the averages
    ```

    **What is averaged.** The trainable weights only. Non-trainable weights
    (the moving mean and variance of BatchNormalization) stay as trained,
    and were estimated for the raw weights, not for the averages: for a
    model with BatchNormalization, re-estimate them inside `averaged()` by
    running training batches through `model(x, training=True)` before
    evaluating or exporting (this changes them permanently).

    **When.** The callback checks at the end of every call of the train
    function (`on_train_batch_end`) and once before the first step of each
    `fit`. An update is made at the first check where at least
    `update_every` optimizer steps have passed since the previous update
    (or since the start). With `steps_per_execution = n > 1`, Keras runs `n`
    steps per call and `on_train_batch_end` fires once per call, so the
    average sees only the weights after steps `n, 2n, 3n, ...` (the
    intermediate weights are never seen), `t` counts those updates, and
    `update_every = u` updates every `ceil(u / n)` calls.

    **Memory.** One extra copy of the trainable weights (in their own
    dtypes) plus two integer scalars.

    **Saving and resuming.** While the callback is attached to a model (it
    is from `fit` on, or after `set_model(model)`), the averages are saved
    and loaded with the model's weights by `model.save_weights`,
    `model.save`, `keras.callbacks.ModelCheckpoint` and
    `keras.callbacks.BackupAndRestore`, so a restarted run continues with
    the same averages. A file written without averaging state leaves the
    callback not started. `save_state` and `load_state` keep the
    callback's state in a file of its own. A model carries the state of one
    `PolyakAveraging` at a time: the one attached last.

    **Distribution.** Under a `tf.distribute` strategy the averages are
    created in the model's strategy scope, so they are mirrored like the
    weights, and each replica updates its own copy.

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
                decay = _common.check_number(
                    "decay",
                    decay,
                    0.0,
                    1.0,
                    low_inclusive=False,
                    high_inclusive=False,
                )
            except ValueError:
                raise ValueError(
                    "Argument `decay` must be a number in (0, 1), or None "
                    f"for the uniform average; received: decay={decay!r}"
                ) from None
        _check_bool("dynamic_decay", dynamic_decay)
        if dynamic_decay and decay is None:
            raise ValueError(
                "Argument `dynamic_decay=True` needs a number `decay` in "
                "(0, 1) to cap the decay; received: decay=None"
            )
        self.decay = decay
        self.dynamic_decay = dynamic_decay
        self.start_step = _common.check_integer("start_step", start_step, 0)
        self.update_every = _common.check_integer("update_every", update_every, 1)
        self.evaluate_with_average = _check_bool(
            "evaluate_with_average", evaluate_with_average
        )
        self.at_train_end = _common.check_choice(
            "at_train_end", at_train_end, ("keep", "apply")
        )
        self._state: _AveragingState | None = None
        self._state_model = None
        self._pending_state: dict[str, Any] | None = None
        self._update_function = None
        self._update_key = ()
        self._check_before_next_batch = False
        self._swapped_for_test = False

    # ------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether averaging has started (the averages hold values)."""
        return self._state is not None and self._state.started()

    @property
    def num_updates(self) -> int:
        """The number of averaging updates made so far (`t`)."""
        if self._state is None:
            return 0
        return int(ops.convert_to_numpy(self._state.num_updates))

    @property
    def averages(self) -> list[keras.Variable]:
        """The Keras variables holding the averages.

        Index-aligned with `model.trainable_variables`. Inside `averaged()`
        the model holds the averages and these variables the raw weights.
        """
        self._require_state("averages")
        return list(self._state.averages)

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
        self._require_started("averaged()")
        if self._state.swapped:
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
        self._require_started("apply()")
        if self._state.swapped:
            raise ValueError(
                "`apply()` cannot be called inside `averaged()`: the model "
                "already holds the averages there."
            )
        with self._scope():
            for weight, average in zip(
                self._state.model_variables, self._state.averages
            ):
                weight.assign(ops.convert_to_tensor(average))

    def get_state(self) -> dict[str, Any]:
        """The averaging state as numpy values.

        Returns:
            A dict with `"averages"` (a list of arrays, index-aligned with
            `model.trainable_variables`), `"num_updates"` and `"last_step"`
            (the optimizer step of the latest update or of the start; -1
            before averaging starts).
        """
        self._require_state("get_state()")
        return self._state.values()

    def set_state(self, state: dict[str, Any]) -> None:
        """Sets the averaging state from `get_state()`'s dict.

        Before the callback is attached to a model, the state is kept and
        set when it is (at the start of `fit`, or by `set_model`).

        Args:
            state: A dict as returned by `get_state()`.
        """
        state = _check_state_dict(state)
        if self._state is None:
            self._pending_state = state
            return
        self._state.assign_values(state)

    def save_state(self, filepath: str) -> None:
        """Saves the averaging state to a `.npz` file.

        Args:
            filepath: Path ending in `.npz`.
        """
        filepath = _check_npz_path(filepath)
        state = self.get_state()
        arrays = {
            "num_updates": np.asarray(state["num_updates"], np.int64),
            "last_step": np.asarray(state["last_step"], np.int64),
        }
        for index, average in enumerate(state["averages"]):
            arrays[f"average_{index}"] = average
        with open(filepath, "wb") as file:
            np.savez(file, **arrays)

    def load_state(self, filepath: str) -> None:
        """Loads the averaging state saved by `save_state`.

        May be called before `fit`: the state is set when the callback is
        attached to the model.

        Args:
            filepath: Path of a `.npz` file written by `save_state`.
        """
        filepath = _check_npz_path(filepath)
        with np.load(filepath) as data:
            count = sum(1 for key in data.files if key.startswith("average_"))
            state = {
                "num_updates": int(data["num_updates"]),
                "last_step": int(data["last_step"]),
                "averages": [data[f"average_{i}"] for i in range(count)],
            }
        self.set_state(state)

    # ------------------------------------------------------------------
    # Keras callback hooks
    # ------------------------------------------------------------------

    def set_model(self, model):
        super().set_model(model)
        if getattr(model, "built", False):
            self._attach(model)

    def on_train_begin(self, logs=None):
        model = self.model
        self._attach(model)
        if self._state.swapped:
            # A previous fit stopped inside an evaluation on the averages:
            # put the raw weights back before training on.
            warnings.warn(
                "PolyakAveraging: the model still held the averages from an "
                "interrupted evaluation; the raw weights were put back."
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
        if (
            self.evaluate_with_average
            and self._state is not None
            and not self._state.swapped
            and self._state.started()
        ):
            self._synced_model()
            self._swap()
            self._swapped_for_test = True

    def on_test_end(self, logs=None):
        if self._swapped_for_test:
            self._swapped_for_test = False
            self._synced_model()
            self._swap()

    def on_train_end(self, logs=None):
        if self.at_train_end != "apply":
            return
        if not self.started:
            warnings.warn(
                "PolyakAveraging(at_train_end='apply'): averaging never "
                f"started (start_step={self.start_step}), so the model keeps "
                "its trained weights."
            )
            return
        self._synced_model()
        self.apply()

    # ------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------

    def _scope(self):
        return _strategy_scope(self._state_model)

    def _synced_model(self):
        # On JAX, fit keeps the model's state outside its variables during an
        # epoch; Keras's `Callback.model` property writes it back first.
        return self.model

    def _attach(self, model) -> None:
        """Creates the state for `model` (or reuses this callback's) and
        mounts it on the model."""
        variables = list(model.trainable_variables)
        state = self._state
        if state is not None and (
            self._state_model is not model
            or not _same_variables(state.model_variables, variables)
        ):
            if self._state_model is model:
                warnings.warn(
                    "PolyakAveraging: the model's trainable variables "
                    "changed; averaging starts again."
                )
            state = None
        if state is None:
            with _strategy_scope(model):
                state = _AveragingState(model)
            self._state = state
            self._state_model = model
            self._update_function = None
        # Bypasses Keras's attribute tracking on purpose: the state must be
        # in the model's weight files, but not one of its layers or weights.
        object.__setattr__(model, STATE_ATTRIBUTE, state)
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            state.assign_values(pending)

    def _require_state(self, what: str) -> None:
        if self._state is None:
            raise ValueError(
                f"PolyakAveraging has no averages yet, so `{what}` cannot be "
                "used: train with `model.fit(..., callbacks=[averaging])` "
                "first (or attach it with `averaging.set_model(model)` and "
                "load a saved state)."
            )

    def _require_started(self, what: str) -> None:
        self._require_state(what)
        if not self._state.started():
            optimizer = getattr(self._state_model, "optimizer", None)
            steps = (
                int(ops.convert_to_numpy(optimizer.iterations))
                if optimizer is not None
                else 0
            )
            raise ValueError(
                f"PolyakAveraging has not started averaging yet, so `{what}` "
                f"cannot be used: it starts at optimizer step "
                f"start_step={self.start_step} and the optimizer has taken "
                f"{steps} steps."
            )

    def _swap(self) -> None:
        """Exchanges the model's trainable weights with the averages."""
        state = self._state
        with self._scope():
            raw = [_snapshot(weight) for weight in state.model_variables]
            for weight, average in zip(state.model_variables, state.averages):
                weight.assign(ops.convert_to_tensor(average))
            for average, value in zip(state.averages, raw):
                average.assign(value)
        state.swapped = not state.swapped

    def _update(self) -> None:
        optimizer = self._synced_model().optimizer
        if self._update_function is None or not _same_variables(
            self._update_key, (self._state, optimizer)
        ):
            self._update_function = _make_update_function(
                self._state,
                optimizer.iterations,
                _Schedule(
                    decay=self.decay,
                    dynamic_decay=self.dynamic_decay,
                    start_step=self.start_step,
                    update_every=self.update_every,
                ),
            )
            self._update_key = (self._state, optimizer)
        with self._scope():
            self._update_function()


# ----------------------------------------------------------------------
# The averaging state, mounted on the model
# ----------------------------------------------------------------------


class _AveragingState(keras.layers.Layer):
    """The averages and their counters (private).

    A Keras layer only so that Keras's weight saving visits it when it is an
    attribute of the model; it is never called.
    """

    def __init__(self, model):
        super().__init__(name="polyak_averaging", trainable=False)
        model_variables = list(model.trainable_variables)
        # Each average takes its weight's sharding layout (the Keras
        # distribution API on JAX), so it is split across devices like the
        # weight; under tf.distribute the strategy scope mirrors it.
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
        self.num_updates = self.add_weight(
            shape=(),
            dtype="int",
            initializer="zeros",
            trainable=False,
            autocast=False,
            name="num_updates",
        )
        self.last_step = self.add_weight(
            shape=(),
            dtype="int",
            initializer=keras.initializers.Constant(-1),
            trainable=False,
            autocast=False,
            name="last_step",
        )
        self.built = True
        # True while the model holds the averages and `averages` the raw
        # weights (inside `averaged()` or an evaluation).
        self.swapped = False
        # A plain holder, so that Keras does not track the model's variables
        # as this layer's own.
        self._links = _Links(model, model_variables)

    @property
    def model_variables(self):
        return self._links.variables

    def started(self) -> bool:
        return int(ops.convert_to_numpy(self.last_step)) >= 0

    def values(self) -> dict[str, Any]:
        averages = self.model_variables if self.swapped else self.averages
        return {
            "averages": [
                np.array(ops.convert_to_numpy(average)) for average in averages
            ],
            "num_updates": int(ops.convert_to_numpy(self.num_updates)),
            "last_step": int(ops.convert_to_numpy(self.last_step)),
        }

    def assign_values(self, state: dict[str, Any]) -> None:
        if self.swapped:
            raise ValueError("The averaging state cannot be set inside `averaged()`.")
        averages = state["averages"]
        if len(averages) != len(self.averages):
            raise ValueError(
                f"The averaging state holds {len(averages)} averages, but the "
                f"model has {len(self.averages)} trainable variables."
            )
        for index, (variable, value) in enumerate(zip(self.averages, averages)):
            value = np.asarray(value)
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Average {index} has shape {tuple(value.shape)}, but "
                    f"trainable variable"
                    f" {_variable_path(self.model_variables[index])!r} "
                    f"has shape {tuple(variable.shape)}."
                )
        with _strategy_scope(self._links.model):
            for variable, value in zip(self.averages, averages):
                variable.assign(
                    np.asarray(value).astype(
                        numpy_dtype(keras.backend.standardize_dtype(variable.dtype))
                    )
                )
            self.num_updates.assign(int(state["num_updates"]))
            self.last_step.assign(int(state["last_step"]))

    def reset(self) -> None:
        self.swapped = False
        with _strategy_scope(self._links.model):
            self.num_updates.assign(0)
            self.last_step.assign(-1)

    # Keras weight files: named entries, and the true averages even while
    # they are swapped into the model.
    def save_own_variables(self, store):
        state = self.values()
        store["num_updates"] = np.asarray(state["num_updates"], np.int64)
        store["last_step"] = np.asarray(state["last_step"], np.int64)
        for index, average in enumerate(state["averages"]):
            store[f"average_{index}"] = average

    def load_own_variables(self, store):
        # A load writes the model's weights and the averages from the same
        # file, so nothing is swapped afterwards.
        self.swapped = False
        keys = list(store.keys())
        if not keys:
            # Written without averaging state: averaging starts again.
            self.reset()
            return
        count = sum(1 for key in keys if str(key).startswith("average_"))
        self.assign_values(
            {
                "num_updates": int(np.asarray(store["num_updates"])),
                "last_step": int(np.asarray(store["last_step"])),
                "averages": [store[f"average_{i}"] for i in range(count)],
            }
        )


class _Links:
    """Plain references Keras's tracking leaves alone."""

    def __init__(self, model, variables):
        self.model = model
        self.variables = list(variables)


# ----------------------------------------------------------------------
# The update: one compiled function over all averages
# ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """The callback's averaging settings, constants of the compiled update."""

    decay: float | None
    dynamic_decay: bool
    start_step: int
    update_every: int


def _plan_update(iteration, last_step, num_updates, schedule: _Schedule):
    """Decides on device what this check does, as a function of tensors.

    Returns:
        `(active, keep, take, new_num_updates)`: whether the averages change
        now; the new average is `keep * average + take * weight`
        (`keep = 0, take = 1` when averaging starts); the new count.
    """
    count_dtype = keras.backend.standardize_dtype("int")
    last_step = ops.cast(last_step, count_dtype)
    iteration = ops.cast(iteration, count_dtype)
    started = ops.greater_equal(last_step, 0)
    starting = ops.logical_and(
        ops.logical_not(started), ops.greater_equal(iteration, schedule.start_step)
    )
    due = ops.logical_and(
        started,
        ops.greater_equal(ops.subtract(iteration, last_step), schedule.update_every),
    )
    updates = ops.cast(num_updates, "float32")
    if schedule.decay is None:
        keep = ops.divide(updates, ops.add(updates, 1.0))
        take = ops.divide(1.0, ops.add(updates, 1.0))
    else:
        keep = ops.convert_to_tensor(schedule.decay, "float32")
        if schedule.dynamic_decay:
            keep = ops.minimum(
                keep, ops.divide(ops.add(updates, 1.0), ops.add(updates, 10.0))
            )
        take = ops.subtract(1.0, keep)
    keep = ops.where(starting, 0.0, keep)
    take = ops.where(starting, 1.0, take)
    new_num_updates = ops.add(
        ops.cast(num_updates, count_dtype), ops.cast(due, count_dtype)
    )
    return ops.logical_or(starting, due), keep, take, new_num_updates


def _blend(average, weight, keep, take):
    """`keep * average + take * weight`, computed in float32 (float64 for
    float64 weights) and returned in the average's dtype."""
    dtype = average.dtype
    compute_dtype = (
        "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"
    )
    result = ops.add(
        ops.multiply(ops.cast(keep, compute_dtype), ops.cast(average, compute_dtype)),
        ops.multiply(ops.cast(take, compute_dtype), ops.cast(weight, compute_dtype)),
    )
    return ops.cast(result, dtype)


def _make_update_function(state: _AveragingState, iterations, schedule: _Schedule):
    """Returns `update()`: one check (and, when due, one update of every
    average), compiled on TensorFlow and JAX."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _make_tensorflow_update(state, iterations, schedule)
    return _make_functional_update(state, iterations, schedule, jit=backend == "jax")


def _make_tensorflow_update(state, iterations, schedule):
    import tensorflow as tf

    def assign_blend(average, weight, keep, take):
        return average.assign(_blend(average, weight, keep, take))

    @tf.function
    def update():
        iteration = ops.convert_to_tensor(iterations)
        active, keep, take, new_num_updates = _plan_update(
            iteration,
            ops.convert_to_tensor(state.last_step),
            ops.convert_to_tensor(state.num_updates),
            schedule,
        )

        def write():
            # Under a tf.distribute strategy each replica blends its own
            # copies (no broadcast of the new averages).
            extended = tf.distribute.get_strategy().extended
            for average, weight in zip(state.averages, state.model_variables):
                extended.update(
                    average.value,
                    assign_blend,
                    args=(weight.value, keep, take),
                    group=False,
                )
            state.last_step.assign(ops.cast(iteration, state.last_step.dtype))
            state.num_updates.assign(new_num_updates)
            return ops.convert_to_tensor(True)

        return ops.cond(active, write, lambda: ops.convert_to_tensor(False))

    def run():
        update()

    run.compiled = update
    return run


def _make_functional_update(state, iterations, schedule, jit: bool):
    def pure_update(iteration, last_step, num_updates, averages, weights):
        active, keep, take, new_num_updates = _plan_update(
            iteration, last_step, num_updates, schedule
        )

        def write():
            return (
                ops.cast(iteration, last_step.dtype),
                ops.cast(new_num_updates, num_updates.dtype),
                [_blend(a, w, keep, take) for a, w in zip(averages, weights)],
            )

        def keep_all():
            return last_step, num_updates, list(averages)

        return ops.cond(active, write, keep_all)

    if jit:
        import jax

        pure_update = jax.jit(pure_update)

    def run():
        last_step, num_updates, averages = pure_update(
            iterations.value,
            state.last_step.value,
            state.num_updates.value,
            [average.value for average in state.averages],
            [weight.value for weight in state.model_variables],
        )
        state.last_step.assign(last_step)
        state.num_updates.assign(num_updates)
        for variable, value in zip(state.averages, averages):
            variable.assign(value)

    run.compiled = pure_update
    return run


# ----------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------


def _strategy_scope(model):
    """The model's tf.distribute strategy scope on TensorFlow (the current
    strategy when `model` is None), else a null context."""
    if keras.backend.backend() != "tensorflow":
        return contextlib.nullcontext()
    import tensorflow as tf

    strategy = (
        getattr(model, "distribute_strategy", None) if model is not None else None
    )
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    return strategy.scope()


def _snapshot(variable):
    """The variable's current value, left intact by later assignments."""
    if keras.backend.backend() == "jax":
        return variable.value  # JAX arrays are immutable: no copy needed.
    # A read (tf.identity on TensorFlow); converting the variable itself can
    # hand back the variable, which the next assignment would overwrite.
    return ops.copy(variable)


def _same_variables(first, second) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second))


def _variable_path(variable) -> str:
    return getattr(variable, "path", None) or str(variable.name)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(
            f"Argument `{name}` must be a bool (True or False); "
            f"received: {name}={value!r}"
        )
    return value


def _check_npz_path(filepath) -> str:
    filepath = str(filepath)
    if not filepath.endswith(".npz"):
        raise ValueError(
            f"Argument `filepath` must end in `.npz`; received: filepath={filepath!r}"
        )
    return filepath


def _check_state_dict(state) -> dict[str, Any]:
    if not isinstance(state, dict) or not {
        "averages",
        "num_updates",
        "last_step",
    } <= set(state):
        raise ValueError(
            "Argument `state` must be a dict with keys 'averages', "
            "'num_updates' and 'last_step' (as returned by `get_state()`); "
            f"received: state={state!r}"
        )
    return {
        "averages": [np.asarray(value) for value in state["averages"]],
        "num_updates": int(state["num_updates"]),
        "last_step": int(state["last_step"]),
    }
