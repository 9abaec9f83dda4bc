"""Private base class: what every keras_soma optimizer shares.

* state ("slots") created beside its variable, so that tf.distribute places
  it with the variable and the Keras distribution API gives it the
  variable's layout (or, for per-axis state, the layout of that axis),
  and none for a variable Keras overwrites with its gradient (float8);
* `get_slots(variable)`, the state of one variable by slot name, the names
  the numpy reference in `keras_soma._reference` uses;
* one update path: each optimizer writes its math once as a pure function
  of tensors (`keras.ops` only) and the base class reads the state, calls
  it, and writes the results back, fused into one XLA kernel per variable
  on TensorFlow where Keras would otherwise run it op by op; on PyTorch
  in eager mode each optimizer's multi-tensor torch update
  (`_torch_update`, in `_torch_step`) makes the step instead;
* `skip_nonfinite`: a step whose gradients hold NaN or Inf leaves the
  variables and the state untouched and is counted (with
  `gradient_accumulation_steps`, its gradients count as zeros instead).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

from keras_soma import _common, _fused, _quantize, _sparse

# Keras's helper for state of a variable's own shape and dtype (3.10 on).
_HAS_ADD_OPTIMIZER_VARIABLES = hasattr(
    keras.optimizers.Optimizer, "add_optimizer_variables"
)


# The values a `momentum_dtype` argument takes: the float dtypes of
# `_common`, and blockwise int8 (`keras_soma._quantize`).
MOMENTUM_DTYPES = (*_common.STATE_DTYPES, "int8")


def check_momentum_format(
    momentum_dtype: Any, block_size: Any, allow_none: bool = False
) -> tuple[str | None, int]:
    """Checks the `momentum_dtype` and `block_size` arguments of an
    optimizer whose momentum may be stored as blockwise int8; returns them
    standardized (`momentum_dtype=None`, where `allow_none`, is kept)."""
    if not (allow_none and momentum_dtype is None):
        momentum_dtype = _common.check_state_dtype(
            "momentum_dtype", momentum_dtype, MOMENTUM_DTYPES
        )
    block_size = _common.check_integer("block_size", block_size, 1)
    return momentum_dtype, block_size


def _overwritten_with_gradient(variable) -> bool:
    """Whether Keras sets `variable` to its gradient instead of passing it
    to `update_step` (float8 training's scale and amax-history variables;
    a tf.Variable has no such attribute)."""
    return bool(getattr(variable, "overwrite_with_gradient", False))


class KerasSomaOptimizer(keras.optimizers.Optimizer):
    """Base class of the keras_soma optimizers (not public API)."""

    # Maps slot name -> attribute holding the per-variable list of state
    # variables (index-aligned with the trainable variables).
    _slot_attributes: dict[str, str] = {}
    # Whether the optimizer offers the `lazy_sparse_updates` choice (its
    # state is all of its variable's shape, so `update_with` can take the
    # row path for it).
    _offers_lazy_sparse_updates: bool = False

    def __init__(
        self,
        learning_rate,
        name: str,
        skip_nonfinite: bool = False,
        fused: bool | None = None,
        lazy_sparse_updates: bool | None = None,
        **kwargs,
    ):
        learning_rate = _common.check_learning_rate(learning_rate)
        if self._offers_lazy_sparse_updates:
            _common.check_bool("lazy_sparse_updates", lazy_sparse_updates)
        elif lazy_sparse_updates is not None:
            raise ValueError(
                f"{type(self).__name__} has no argument `lazy_sparse_updates` "
                "(it has one way of applying row-sliced gradients); "
                f"received: lazy_sparse_updates={lazy_sparse_updates!r}"
            )
        _common.check_bool("skip_nonfinite", skip_nonfinite)
        _common.check_optional_bool("fused", fused)
        # Keras takes these unchecked (a negative or NaN one silently turns
        # the option off or poisons the step); 0 is off, as in Keras. A
        # variable (a scheduled weight decay, which Keras reads at every
        # step) is passed on as it is.
        for key in ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm"):
            value = kwargs.get(key)
            if value is not None and not _common.is_variable(value):
                kwargs[key] = _common.check_number(
                    key, value, low=0.0, high=math.inf, high_inclusive=False
                )
        if kwargs.get("gradient_accumulation_steps") is not None:
            kwargs["gradient_accumulation_steps"] = _check_accumulation(
                kwargs["gradient_accumulation_steps"], lazy_sparse_updates
            )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.skip_nonfinite = skip_nonfinite
        self.fused = fused
        self.lazy_sparse_updates = lazy_sparse_updates
        self._kernel_batch = _KernelBatch()
        # id(state variable) -> the dtype it stands for, for state stored
        # in a wider dtype (see `add_slot`).
        self._stored_wider = {}

    # ------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------

    def build(self, var_list):
        if self.built:
            return
        # Before anything is created: a refused option leaves nothing built.
        self._check_requested_paths(in_update=False)
        # What an unbuilt optimizer saves (its step counter and learning
        # rate come first in `variables`): see `load_own_variables`.
        self._unbuilt_variable_count = len(self.variables)
        super().build(var_list)
        if self.skip_nonfinite:
            self._skipped_steps = self.add_variable(
                shape=(), dtype="int32", name="skipped_steps"
            )

    def add_slot(
        self,
        variable,
        slot: str,
        dtype: str | None = None,
        shape: Sequence[int] | None = None,
        layout: Any = "follow",
        initializer="zeros",
    ):
        """Creates one state tensor for `variable`, or None.

        A variable Keras overwrites with its gradient
        (`variable.overwrite_with_gradient`: the scales and amax histories
        of float8 training) never reaches `update_step` and gets no state:
        None is returned and nothing is created, as Keras's own optimizers
        do.

        With the variable's own shape and dtype the state is made by
        Keras's helper, `add_optimizer_variables` (Keras 3.10 on; before,
        `add_variable_from_reference`). Otherwise (another dtype, or a
        per-axis shape) the tensor is created colocated with the variable
        under tf.distribute, and with `layout` ("follow" copies the
        variable's layout; pass a layout, or None, for per-axis state).

        Under MultiWorkerMirroredStrategy with more than one worker, state
        of a dtype TensorFlow cannot broadcast between workers (int8,
        bfloat16) is stored in a wider dtype that holds its every value
        (int32, float32); the update still reads and rounds it as `dtype`,
        so the numbers are those of `dtype`.
        """
        dtype = keras.backend.standardize_dtype(dtype or variable.dtype)
        shape = tuple(variable.shape) if shape is None else tuple(shape)
        if (
            keras.backend.standardize_dtype(dtype)
            == keras.backend.standardize_dtype(variable.dtype)
            and shape == tuple(variable.shape)
            and layout == "follow"
        ):
            if _HAS_ADD_OPTIMIZER_VARIABLES:
                (state,) = self.add_optimizer_variables(
                    [variable], slot, initializer=initializer
                )
                return state
            if _overwritten_with_gradient(variable):
                return None
            return self.add_variable_from_reference(
                variable, name=slot, initializer=initializer
            )
        if _overwritten_with_gradient(variable):
            return None
        if layout == "follow":
            layout = _common.variable_layout(variable)
        storage_dtype = _storage_dtype(dtype)
        with _colocated_with(variable):
            state = self.add_variable(
                shape=shape,
                initializer=initializer,
                dtype=storage_dtype,
                name=_common.state_name(variable, slot),
                **_common.layout_keyword(self.add_variable, layout),
            )
        if storage_dtype != dtype:
            self._stored_wider[id(state)] = dtype
        return state

    def add_block_scales(self, var_list, block_size: int) -> list[Any]:
        """The `momentum_scale` slots of a blockwise int8 momentum
        (`keras_soma._quantize`): for each variable, one float32 per
        `block_size` consecutive elements of its row-major flattening,
        `[ceil(size / block_size)]`, replicated (a few bytes per block),
        initialized to 1 so that a scale is never 0."""
        return [
            self.add_slot(
                variable,
                "momentum_scale",
                dtype="float32",
                shape=(
                    _quantize.block_count(
                        _quantize.element_count(variable.shape), block_size
                    ),
                ),
                layout=None,
                initializer="ones",
            )
            for variable in var_list
        ]

    def get_slots(self, variable) -> dict[str, Any]:
        """The optimizer state of one trainable variable, by slot name.

        Args:
            variable: A variable this optimizer was built with.

        Returns:
            A dict mapping slot names (the names used by
            `keras_soma._reference`) to Keras variables; slots a variable
            does not have (e.g. SM3's momentum at `momentum=0`) are absent,
            and a variable Keras overwrites with its gradient has none.
        """
        if not self.built:
            raise ValueError(
                f"Optimizer {self.name!r} has no state yet: call "
                "`optimizer.build(model.trainable_variables)` or train first."
            )
        index = self._get_variable_index(variable)
        slots = {}
        for slot, attribute in self._slot_attributes.items():
            values = getattr(self, attribute, None)
            if values is None:
                continue
            value = values[index]
            if isinstance(value, (list, tuple)):
                for axis, item in enumerate(value):
                    if item is not None:
                        slots[f"{slot}_{axis}"] = item
            elif value is not None:
                slots[slot] = value
        return slots

    @property
    def skipped_steps(self):
        """How many steps `skip_nonfinite=True` has skipped (an int32
        variable), or None when the option is off."""
        return getattr(self, "_skipped_steps", None)

    # ------------------------------------------------------------------
    # Update
    # ------------------------------------------------------------------

    def apply(self, grads, trainable_variables=None):
        # Before the build and any write: a refused option changes nothing.
        self._check_requested_paths(in_update=True)
        if not self.skip_nonfinite:
            return super().apply(grads, trainable_variables)
        if not self.built:
            if trainable_variables is None:
                # Keras's refusal ("the optimizer must already be built"),
                # before anything is built.
                return super().apply(grads, trainable_variables)
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        finite = _common.all_finite(_sparse.values_of(gradient) for gradient in grads)
        if self.gradient_accumulation_steps:
            # Skipping a whole window would take a copy of the state as it
            # was before the window; instead a non-finite micro-step's
            # gradients count as zeros, and the window steps as usual.
            grads = [
                _sparse.map_values(
                    gradient,
                    lambda values: ops.where(finite, values, ops.zeros_like(values)),
                )
                for gradient in grads
            ]
            self._step_is_finite = None
        else:
            self._step_is_finite = finite
        try:
            super().apply(grads, trainable_variables)
        finally:
            self._step_is_finite = None
        self.assign_add(
            self._skipped_steps,
            ops.cast(ops.logical_not(finite), "int32"),
        )

    def _finite_flag(self):
        return getattr(self, "_step_is_finite", None)

    def update_with(
        self,
        step_fn: Callable,
        variable,
        gradient,
        slots: Sequence[Any],
        learning_rate,
        hyperparameters: Sequence[Any] = (),
    ) -> None:
        """Runs `step_fn` on the variable and its state and writes back.

        `step_fn(value, gradient, *slot_values, learning_rate,
        *hyperparameters)` returns `(new_value, *new_slot_values)`.
        Sparse gradients (`keras_soma._sparse`) are made dense first (the
        optimizers with a row path handle row-sliced ones before calling
        this), or, with `lazy_sparse_updates=True`, row-sliced ones go to
        `update_rows_with` (every slot must then have the variable's rows
        as its first dimension).
        """
        if self.lazy_sparse_updates and _sparse.is_row_sliced(gradient):
            self.update_rows_with(
                step_fn, variable, gradient, slots, learning_rate, hyperparameters
            )
            return
        gradient = _sparse.densify(gradient)
        learning_rate = ops.cast(learning_rate, variable.dtype)
        targets = [variable, *slots]
        compute = self._step_computation(step_fn, targets, hyperparameters)
        if self._use_fused_kernel():
            kernel = (targets, compute, gradient, learning_rate)
            if self._kernel_batch.collecting:
                self._kernel_batch.kernels.append(kernel)
            else:
                _fused.update_many([kernel])
            return
        values = [ops.convert_to_tensor(target) for target in targets]
        for target, result in zip(targets, compute(values, gradient, learning_rate)):
            self.assign(target, result)

    def update_rows_with(
        self,
        step_fn: Callable,
        variable,
        gradient,
        row_slots: Sequence[Any],
        learning_rate,
        hyperparameters: Sequence[Any] = (),
    ) -> None:
        """Like `update_with`, on the rows a row-sliced gradient
        (`tf.IndexedSlices`, a BCOO or torch sparse COO tensor with one
        sparse dimension) touches and nothing else (the lazy row path).

        Rows named more than once in `gradient` are summed first. Only
        those rows of `variable` and of each of `row_slots` (state whose
        first dimension indexes the variable's rows) are read, passed to
        `step_fn` with the summed row gradients, and written back. On
        TensorFlow no full-size temporary is made (a gather and a scatter);
        on JAX and torch the write is an update of the whole value at those
        rows (in place on JAX when the compiled step donates its
        variables). Weight decay, like the rest of the update, reaches only
        the touched rows.
        """
        indices, row_gradient = _sparse.unique_rows(gradient)
        learning_rate = ops.cast(learning_rate, variable.dtype)
        targets = [variable, *row_slots]
        compute = self._step_computation(step_fn, targets, hyperparameters)
        values = [_sparse.gather_rows(target, indices) for target in targets]
        for target, result in zip(
            targets, compute(values, row_gradient, learning_rate)
        ):
            self.assign(target, _sparse.rows_written(target, result, indices))

    def update_int8_rows_with(
        self,
        step_fn: Callable,
        variable,
        gradient,
        row_slots: Sequence[Any],
        codes,
        scales,
        block_size: int,
        learning_rate,
        hyperparameters: Sequence[Any] = (),
    ) -> None:
        """`update_rows_with` where the momentum is blockwise int8
        (`codes` and `scales`, `keras_soma._quantize`): the row path of a
        row-sliced gradient reads and writes its rows of `variable` and of
        `row_slots`, and of the momentum the smallest runs of whole rows
        that are also runs of whole blocks (`_quantize.row_groups`) that
        hold them; only the blocks holding an element of a row stepped are
        requantized (`_quantize.on_int8_rows`, which says what `step_fn`
        takes and returns)."""
        indices, row_gradient = _sparse.unique_rows(gradient)
        rows = int(variable.shape[0])
        group_rows, group_blocks = _quantize.row_groups(
            tuple(variable.shape), block_size
        )
        groups_total = -(-rows // group_rows)
        in_range = ops.less(indices, rows)
        # Padding rows (a BCOO's) fall in a group past the last.
        groups, group_positions = _sparse.unique_with_positions(
            ops.where(in_range, ops.floor_divide(indices, group_rows), groups_total),
            fill_value=groups_total,
        )
        positions = ops.add(
            ops.multiply(ops.cast(group_positions, indices.dtype), group_rows),
            ops.where(in_range, ops.mod(indices, group_rows), 0),
        )

        def runs(length):
            starts = ops.expand_dims(ops.multiply(groups, length), 1)
            offsets = ops.expand_dims(ops.arange(length, dtype=groups.dtype), 0)
            return ops.reshape(ops.add(starts, offsets), (-1,))

        tile_rows, tile_blocks = runs(group_rows), runs(group_blocks)
        targets = [variable, *row_slots, codes, scales]
        compute = self._step_computation(
            _quantize.on_int8_rows(step_fn, len(row_slots), block_size),
            targets,
            (positions, *hyperparameters),
        )
        values = [
            _sparse.gather_rows(target, indices) for target in [variable, *row_slots]
        ]
        values += [
            _sparse.gather_rows(codes, tile_rows, padded=True),
            _sparse.gather_rows(scales, tile_blocks, padded=True),
        ]
        results = compute(values, row_gradient, ops.cast(learning_rate, variable.dtype))
        *row_results, new_codes, new_scales = results
        for target, result in zip([variable, *row_slots], row_results):
            self.assign(target, _sparse.rows_written(target, result, indices))
        self.assign(
            codes, _sparse.rows_written(codes, new_codes, tile_rows, padded=True)
        )
        self.assign(
            scales, _sparse.rows_written(scales, new_scales, tile_blocks, padded=True)
        )

    def _step_computation(self, step_fn, targets, hyperparameters):
        """`compute(values, gradient, learning_rate)`: weight decay, then
        `step_fn`, then (with `skip_nonfinite`) the old values kept on a
        non-finite step, cast to the dtypes of `targets`."""
        finite = self._finite_flag()
        weight_decay = self._weight_decay_for(targets[0])
        dtypes = [
            self._stored_wider.get(id(target), target.dtype) for target in targets
        ]

        def compute(values, gradient, learning_rate):
            values = [ops.cast(value, dtype) for value, dtype in zip(values, dtypes)]
            value = values[0]
            if weight_decay is not None:
                # Decoupled decay, as Keras applies it before the update,
                # but inside the same kernel.
                value = ops.subtract(
                    value,
                    ops.multiply(ops.multiply(value, weight_decay), learning_rate),
                )
            results = step_fn(
                value, gradient, *values[1:], learning_rate, *hyperparameters
            )
            if finite is not None:
                results = [
                    ops.where(finite, new, old) for new, old in zip(results, values)
                ]
            return [
                ops.cast(ops.cast(result, dtype), target.dtype)
                for result, dtype, target in zip(results, dtypes, targets)
            ]

        return compute

    def _weight_decay_for(self, variable):
        if self.weight_decay is None or not self._use_weight_decay(variable):
            return None
        return ops.cast(self.weight_decay, variable.dtype)

    def _apply_weight_decay(self, variables):
        # Keras applies decoupled weight decay as a separate pass over every
        # variable before `update_step`; keras_soma folds it into the
        # variable's update (`update_with`), which saves that pass and lets
        # `skip_nonfinite` leave a skipped step's weights untouched.
        return

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Where a step's updates are fused, they are all made here rather
        # than by Keras's `update_step` per variable. On TensorFlow they are
        # collected and compiled into one XLA function: one launch per step
        # instead of one per variable, which is what matters for models of
        # many small variables. On PyTorch (eager) they are written with
        # in-place and multi-tensor torch ops (`_torch_step`).
        path = self._fused_path()
        if path == "torch":
            self._torch_update_step(grads, trainable_variables, learning_rate)
            return
        if path != "xla":
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            return
        self._kernel_batch.collecting = True
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            kernels = self._kernel_batch.kernels
        finally:
            self._kernel_batch.reset()
        if kernels:
            _fused.update_many(kernels)

    def _torch_update_step(self, grads, trainable_variables, learning_rate):
        """The step on PyTorch outside torch.compile: the optimizer's
        multi-tensor update (`_torch_update`) for the variables it takes,
        `update_step` for the others. A step `skip_nonfinite` skips is
        known here (eager mode), so nothing is computed for it."""
        import torch

        with torch.no_grad():
            finite = self._finite_flag()
            if finite is not None and not bool(finite):
                return
            rest = self._torch_update(
                list(grads), list(trainable_variables), learning_rate
            )
            for gradient, variable in rest:
                self.update_step(gradient, variable, learning_rate)

    def _torch_update(self, grads, trainable_variables, learning_rate):
        """Updates the variables the optimizer has a multi-tensor torch
        update for (`keras_soma._torch_step`) and returns the `(gradient,
        variable)` pairs left to `update_step`. The base class takes none."""
        return list(zip(grads, trainable_variables))

    def _torch_split(self, grads, trainable_variables, learning_rate, rows_apart):
        """Splits a step's `(gradient, variable)` pairs into those the
        multi-tensor torch update takes and the rest (for `update_step`).

        Taken: non-empty float32 variables with float32 gradients, dense or
        sparse ones made dense; row-sliced ones are left to the row path
        where `rows_apart` is True.

        Returns:
            `(taken, rest)`: `taken` is None where nothing is taken, else a
            `_TorchStep` with what `_torch_step`'s functions take.
        """
        pairs, rest = [], []
        for gradient, variable in zip(grads, trainable_variables):
            row_path = rows_apart and _sparse.is_row_sliced(gradient)
            dense = (
                None if row_path else ops.convert_to_tensor(_sparse.densify(gradient))
            )
            if (
                dense is not None
                and keras.backend.standardize_dtype(variable.dtype) == "float32"
                and keras.backend.standardize_dtype(dense.dtype) == "float32"
                and int(dense.numel()) > 0
            ):
                pairs.append((dense, variable))
            else:
                rest.append((gradient, variable))
        if not pairs:
            return None, rest
        learning_rate = ops.cast(learning_rate, "float32")
        rates = []
        for _, variable in pairs:
            weight_decay = self._weight_decay_for(variable)
            rates.append(None if weight_decay is None else weight_decay * learning_rate)
        taken = _TorchStep(
            indices=[self._get_variable_index(variable) for _, variable in pairs],
            values=[variable.value for _, variable in pairs],
            gradients=[dense for dense, _ in pairs],
            variables=[variable for _, variable in pairs],
            learning_rate=learning_rate,
            rates=rates,
        )
        return taken, rest

    def _fused_path(self) -> str | None:
        """ "xla", "torch" or None (op by op); see `_fused`."""
        if self.fused is False:
            return None
        reason = _fused.unavailable_reason()
        if reason is not None:
            if self.fused is True:
                raise _fused.refusal(reason)
            return None
        return _fused.path()

    def _use_fused_kernel(self) -> bool:
        return self._fused_path() == "xla"

    def _check_requested_paths(self, in_update: bool) -> None:
        """Raises a ValueError where an option asks for an update path
        that does not exist here (`fused=True` off the fused path's
        ground). `None` options are never refused: they take a path where
        it exists. Optimizers with paths of their own extend this.

        Args:
            in_update: False at build time, when it is not known yet
                whether updates will run inside a tf.function.
        """
        if self.fused is True:
            reason = _fused.unavailable_reason(in_update)
            if reason is not None:
                raise _fused.refusal(reason)

    def save_own_variables(self, store):
        """Saves the state, as Keras's optimizers do, also where a state
        tensor spans several processes' devices (JAX): majority-vote Soma's
        per-worker momenta, sharded along the data axis, are gathered from
        every process first (`process_allgather`), which Keras's default
        (`variable.numpy()`) refuses. Every process must save together, as
        `model.save` and `BackupAndRestore` do under a multi-process
        distribution."""
        for index, variable in enumerate(self.variables):
            store[str(index)] = _host_value(variable)

    def load_own_variables(self, store):
        """Loads saved state, refusing anything that does not fit.

        Keras's default only warns and skips the optimizer when the number
        of saved variables differs, and would silently cast state saved by
        another optimizer with the same count. Here a different count,
        shape or dtype raises a ValueError before anything is assigned, so
        the state is either loaded whole or left as it was. Two
        differences are not refused:

        * the step counter's integer dtype: int64 on TensorFlow, int32 on
          JAX and torch, so a model saved on one backend loads on another;
        * the state of an optimizer saved before it was built (a model
          compiled but not trained yet): its step counter (0) and learning
          rate load into a built optimizer that has not stepped yet either
          (its state is then as it was built, which is what the unbuilt
          optimizer would have built). A store of that size whose step
          counter is not 0 (say, Keras SGD's after training) is refused.
        """
        variables = self.variables
        unbuilt_count = getattr(self, "_unbuilt_variable_count", None)
        if (
            len(store.keys()) == unbuilt_count
            and unbuilt_count < len(variables)
            and _common.to_int(self._iterations) == 0
            and np.ndim(store["0"]) == 0
            and int(np.asarray(store["0"])) == 0
        ):
            variables = variables[:unbuilt_count]
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Cannot load optimizer state into {type(self).__name__} "
                f"{self.name!r}: it has {len(variables)} variables but the "
                f"saved state has {len(store.keys())}. The state was saved by "
                "a different optimizer, for a different model, or before the "
                "optimizer was built. Build this optimizer on the model's "
                "trainable variables, or load the model without its "
                "optimizer state (`compile=False`)."
            )
        values = [store[str(index)] for index in range(len(variables))]
        for variable, value in zip(variables, values):
            expected = (
                tuple(variable.shape),
                keras.backend.standardize_dtype(variable.dtype),
            )
            received = (
                tuple(value.shape),
                keras.backend.standardize_dtype(value.dtype),
            )
            if variable is self._iterations and _both_integers(expected, received):
                continue
            if expected != received:
                raise ValueError(
                    f"Cannot load optimizer state into {type(self).__name__} "
                    f"{self.name!r}: variable {variable.path!r} has shape and "
                    f"dtype {expected}, the saved value has {received}. The "
                    "state was saved by a different optimizer or for "
                    "different shapes; nothing was loaded."
                )
        for variable, value in zip(variables, values):
            variable.assign(value)

    def get_config(self):
        config = super().get_config()
        config.update({"skip_nonfinite": self.skip_nonfinite, "fused": self.fused})
        if self._offers_lazy_sparse_updates:
            config["lazy_sparse_updates"] = self.lazy_sparse_updates
        return config


def _both_integers(expected, received) -> bool:
    """Whether two `(shape, dtype)` pairs differ in integer width only."""
    return expected[0] == received[0] and "int" in expected[1] and "int" in received[1]


def _host_value(variable):
    """`variable`'s value as a numpy array; on JAX gathered from every
    process where its array spans devices of other processes."""
    value = variable.value
    if keras.backend.backend() == "jax" and not getattr(
        value, "is_fully_addressable", True
    ):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return variable.numpy()


def _check_accumulation(steps, lazy_sparse_updates) -> int:
    """Returns `gradient_accumulation_steps` as an int (it must be one >=
    2) and refuses it with `lazy_sparse_updates=True`."""
    steps = _common.check_integer("gradient_accumulation_steps", steps, 2)
    if lazy_sparse_updates:
        raise ValueError(
            "Argument `lazy_sparse_updates` must be False when "
            "`gradient_accumulation_steps` is set (the micro-steps of a "
            "window touch different rows, and updating only the rows of "
            "their mean would take a record of the rows each window "
            f"touched); received: lazy_sparse_updates={lazy_sparse_updates!r}, "
            f"gradient_accumulation_steps={steps!r}"
        )
    return steps


class _TorchStep(NamedTuple):
    """The variables one multi-tensor torch step takes (`_torch_split`),
    with the arguments `keras_soma._torch_step`'s functions take."""

    indices: list  # each variable's index in the optimizer
    values: list  # the variables' torch tensors
    gradients: list  # dense float32 gradients
    variables: list  # the Keras variables
    learning_rate: Any  # a float32 scalar tensor
    rates: list  # weight_decay * learning_rate per variable, or None


class _KernelBatch:
    """The fused updates collected during one `_backend_update_step`."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.collecting = False
        self.kernels = []


# The dtypes TensorFlow's collective broadcast carries. With more than one
# worker, MultiWorkerMirroredStrategy broadcasts every new variable's
# initial value from the chief with it, and cannot create others.
_BROADCAST_DTYPES = ("bool", "float16", "float32", "float64", "int32", "int64")


def multi_worker_storage_dtype(dtype: str) -> str:
    """The dtype state of `dtype` is stored in under MultiWorkerMirroredStrategy
    with more than one worker: `dtype` itself if TensorFlow can broadcast
    it, else the wider dtype that holds its values (int32 for integers,
    float32 for bfloat16)."""
    if dtype in _BROADCAST_DTYPES:
        return dtype
    return "int32" if "int" in dtype else "float32"


def _storage_dtype(dtype: str) -> str:
    """`dtype`, or `multi_worker_storage_dtype(dtype)` where the current
    tf.distribute strategy cannot create a variable of `dtype`."""
    if keras.backend.backend() != "tensorflow" or dtype in _BROADCAST_DTYPES:
        return dtype
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return dtype
    strategy = tf.distribute.get_strategy()
    multi_worker = isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.num_replicas_in_sync > len(strategy.extended.worker_devices)
    if not multi_worker:
        return dtype
    return multi_worker_storage_dtype(dtype)


def _colocated_with(variable):
    """Under tf.distribute, a context that places new variables with
    `variable` (what Keras does in add_variable_from_reference)."""
    if keras.backend.backend() != "tensorflow":
        return contextlib.nullcontext()
    import tensorflow as tf

    native = variable.value if isinstance(variable, keras.Variable) else variable
    return tf.distribute.get_strategy().extended.colocate_vars_with(native)
