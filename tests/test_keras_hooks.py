"""The private Keras hooks keras_soma depends on, each checked on its own.

keras_soma subclasses `keras.optimizers.Optimizer` and, besides the public
API, overrides or calls a few private members of it (and reads one private
attribute of Keras variables and one private TensorFlow function). Keras
may rename or change those in any release without notice. Most of the
suite would then fail far from the cause, or worse, pass while weight
decay is applied twice. The tests here fail first, each naming the hook
that changed, the Keras version, and the keras_soma code that relies on
it: when one fails, update that code (and the `keras>=` floor in
pyproject.toml if the fix needs a newer Keras).

The hooks:

* `Optimizer._apply_weight_decay(variables)`: overridden to switch off
  Keras's separate weight-decay pass; keras_soma folds the decay into its
  own update (`keras_soma/_base.py`).
* `Optimizer._backend_update_step(grads, trainable_variables,
  learning_rate)`: overridden to batch one step's fused XLA updates (Keras's
  own must call `update_step` for each variable synchronously) and, on
  PyTorch in eager mode, to make all of a step's updates with multi-tensor
  torch ops (it must be given the step's gradients and variables, in
  order, after weight decay's hook and without the variables Keras
  overwrites with their gradient).
* `Optimizer._get_variable_index(variable)`: each variable's state.
* `Optimizer._use_weight_decay(variable)`: `exclude_from_weight_decay`.
* `Optimizer._trainable_variables`: read by `apply` with `skip_nonfinite`.
* `Optimizer.add_variable(..., layout=...)` and `keras.Variable(...,
  layout=...)` (Keras 3.10 on), and the variable's `_layout`: optimizer
  state and Polyak averages laid out like their weight.
* `Optimizer.add_optimizer_variables` (public, Keras 3.10 on) and Keras's
  filtering of `overwrite_with_gradient` variables in `apply`: no state
  for the scale and amax-history variables of float8 training.
* TensorFlow's `is_op_determinism_enabled`: no fused kernels under op
  determinism.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
from conftest import requires_jax, requires_tensorflow
from helpers import to_numpy
from registry import REGISTRY

from keras_soma import _base, _common, _fused

KERAS = f"Keras {keras.__version__}"
SPECS = [pytest.param(spec, id=name) for name, spec in REGISTRY.items()]

# name -> (parameter names after `self`, why keras_soma needs it).
OPTIMIZER_HOOKS = {
    "_apply_weight_decay": (
        ["variables"],
        "keras_soma overrides it to switch off Keras's own weight-decay pass "
        "and folds weight decay into its update (keras_soma/_base.py)",
    ),
    "_backend_update_step": (
        ["grads", "trainable_variables", "learning_rate"],
        "keras_soma overrides it to batch one step's fused XLA updates and, "
        "on PyTorch, to make a step's updates with multi-tensor torch ops "
        "(keras_soma/_base.py)",
    ),
    "_get_variable_index": (
        ["variable"],
        "keras_soma finds each variable's state with it (update_step in "
        "soma.py, gradsign.py and sm3.py; get_slots in _base.py)",
    ),
    "_use_weight_decay": (
        ["variable"],
        "keras_soma asks it whether to decay a variable "
        "(exclude_from_weight_decay; keras_soma/_base.py)",
    ),
}


def parameter_names(function):
    return list(inspect.signature(function).parameters)[1:]


@pytest.mark.parametrize("name", sorted(OPTIMIZER_HOOKS))
def test_optimizer_hook_exists_with_its_signature(name):
    expected, reason = OPTIMIZER_HOOKS[name]
    hook = getattr(keras.optimizers.Optimizer, name, None)
    assert callable(hook), (
        f"{KERAS} no longer has Optimizer.{name}; {reason} — update it"
    )
    assert parameter_names(hook) == expected, (
        f"{KERAS} changed Optimizer.{name} to take "
        f"{parameter_names(hook)} instead of {expected}; {reason} — update it"
    )


def spy_class(cls):
    """`cls` recording, in order, the hooks Keras calls during `apply`."""

    class Spy(cls):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.events = []

        def _apply_weight_decay(self, variables):
            self.events.append(("_apply_weight_decay", list(variables)))
            return super()._apply_weight_decay(variables)

        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            self.events.append(
                (
                    "_backend_update_step",
                    [self._get_variable_index(v) for v in trainable_variables],
                )
            )
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            self.events.append(("_backend_update_step returned", None))

        def update_step(self, gradient, variable, learning_rate):
            # By index: on TensorFlow Keras passes the tf.Variable behind it.
            self.events.append(("update_step", self._get_variable_index(variable)))
            super().update_step(gradient, variable, learning_rate)

    Spy.__name__ = f"Spy{cls.__name__}"
    return Spy


def spied_step(spec, **kwargs):
    """One eager `apply` of a spying `spec.cls(**kwargs)` with weight decay,
    on two ordinary variables and one that Keras overwrites with its
    gradient."""
    kernel = keras.Variable(np.ones((2, 3), "float32"), name="kernel")
    bias = keras.Variable(np.ones((3,), "float32"), name="bias")
    scale = keras.Variable(np.ones((), "float32"), name="scale")
    scale.overwrite_with_gradient = True
    variables = [kernel, bias, scale]
    optimizer = spy_class(spec.cls)(learning_rate=0.1, weight_decay=0.5, **kwargs)
    optimizer.build(variables)
    gradients = [
        keras.ops.full((2, 3), 0.25),
        keras.ops.full((3,), -0.25),
        keras.ops.convert_to_tensor(np.float32(7.0)),
    ]
    optimizer.apply(gradients, variables)
    return optimizer, variables


# On PyTorch in eager mode, `fused=None` makes the updates in
# `_backend_update_step` itself (no `update_step`); `fused=False` runs
# Keras's own `_backend_update_step`, as every backend's other paths do.
FUSED_CASES = (
    [pytest.param(None, id="fused=None"), pytest.param(False, id="fused=False")]
    if keras.backend.backend() == "torch"
    else [pytest.param(None, id="fused=None")]
)


@pytest.mark.parametrize("fused", FUSED_CASES)
@pytest.mark.parametrize("spec", SPECS)
def test_keras_calls_the_overridden_hooks_during_apply(spec, fused):
    optimizer, (_, _, scale) = spied_step(spec, fused=fused)
    names = [name for name, _ in optimizer.events]
    assert "_apply_weight_decay" in names, (
        f"{KERAS} no longer calls Optimizer._apply_weight_decay during apply; "
        "keras_soma folds weight decay into its update through this hook "
        "(keras_soma/_base.py) — update it, or weight decay is applied twice"
    )
    assert names.count("_apply_weight_decay") == 1, names
    assert "_backend_update_step" in names, (
        f"{KERAS} no longer calls Optimizer._backend_update_step during apply; "
        "keras_soma batches one step's fused XLA updates through this hook "
        "(keras_soma/_base.py) — update it"
    )
    assert names.index("_apply_weight_decay") < names.index("_backend_update_step"), (
        f"{KERAS} calls Optimizer._apply_weight_decay after the update; "
        "keras_soma's weight decay (folded into the update, "
        "keras_soma/_base.py) assumes it comes first — update it"
    )
    start = names.index("_backend_update_step")
    end = names.index("_backend_update_step returned")
    assert optimizer.events[start][1] == [0, 1], (
        f"{KERAS} no longer passes Optimizer._backend_update_step the step's "
        "variables (in order, without those it overwrites with their "
        "gradient); keras_soma makes a step's updates from them "
        "(keras_soma/_base.py) — update it"
    )
    updated = [index for name, index in optimizer.events if name == "update_step"]
    inside = [
        index
        for position, (name, index) in enumerate(optimizer.events)
        if name == "update_step" and start < position < end
    ]
    if keras.backend.backend() == "torch" and fused is None:
        # The multi-tensor torch update made them (keras_soma/_torch_step.py).
        assert updated == [], updated
    else:
        assert inside == [0, 1], (
            f"{KERAS}'s Optimizer._backend_update_step no longer calls "
            "update_step for each variable before it returns; keras_soma "
            "collects the fused kernels of a step in between "
            "(keras_soma/_base.py) — update it"
        )
    assert 2 not in updated, (
        f"{KERAS} passes a variable with overwrite_with_gradient=True to "
        "update_step; keras_soma creates no state for such variables "
        "(keras_soma/_base.py add_slot) — update it"
    )
    np.testing.assert_array_equal(
        to_numpy(scale),
        7.0,
        err_msg=f"{KERAS} no longer overwrites an overwrite_with_gradient "
        "variable with its gradient in apply",
    )


@pytest.mark.parametrize("spec", SPECS)
def test_overwritten_variable_gets_no_state(spec):
    optimizer, (kernel, bias, scale) = spied_step(spec)
    assert optimizer.get_slots(scale) == {}
    assert optimizer.get_slots(kernel) and optimizer.get_slots(bias)


def test_variable_index_and_weight_decay_exclusion_behave():
    variables = [keras.Variable(np.ones(shape, "float32")) for shape in [(2,), (3,)]]
    optimizer = REGISTRY["Soma"].cls(weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_list=[variables[1]])
    assert isinstance(getattr(optimizer, "_trainable_variables", None), list), (
        f"{KERAS}'s Optimizer has no `_trainable_variables` list before build; "
        "keras_soma's apply reads it with skip_nonfinite=True "
        "(keras_soma/_base.py) — update it"
    )
    optimizer.build(variables)
    assert [optimizer._get_variable_index(v) for v in variables] == [0, 1], (
        f"{KERAS}'s Optimizer._get_variable_index no longer gives a variable's "
        "position in the build list; keras_soma's per-variable state lists "
        "are index-aligned with it — update it"
    )
    assert [v is w for v, w in zip(optimizer._trainable_variables, variables)] == [
        True,
        True,
    ], f"{KERAS}'s Optimizer._trainable_variables is no longer the build list"
    assert optimizer._use_weight_decay(variables[0]) is True
    assert optimizer._use_weight_decay(variables[1]) is False, (
        f"{KERAS}'s Optimizer._use_weight_decay ignores "
        "exclude_from_weight_decay; keras_soma relies on it "
        "(keras_soma/_base.py) — update it"
    )


def test_variable_constructors_take_a_layout_where_keras_lays_out_state():
    for constructor, user in [
        (keras.optimizers.Optimizer.add_variable, "keras_soma/_base.py add_slot"),
        (keras.Variable, "the Polyak averages, keras_soma/callbacks.py"),
    ]:
        takes_layout = "layout" in inspect.signature(constructor).parameters
        expected = {"layout": "a layout"} if takes_layout else {}
        assert _common.layout_keyword(constructor, "a layout") == expected
        if hasattr(keras.optimizers.Optimizer, "add_optimizer_variables"):
            # Keras 3.10 on lays out new variables through this argument.
            assert takes_layout, (
                f"{KERAS}'s {constructor.__qualname__} no longer takes "
                "`layout`; keras_soma lays out new variables like the weight "
                f"they belong to through it ({user}) — update it"
            )
    assert _common.variable_layout(keras.Variable(np.ones((2,), "float32"))) is None


@requires_jax
def test_jax_variables_keep_their_layout_as_underscore_layout():
    import jax

    if not _common.layout_keyword(keras.Variable, None):
        pytest.skip("Keras before 3.10 lays out every new variable itself")
    devices = keras.distribution.list_devices("cpu")
    if len(devices) < 2 or len(jax.devices()) < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2")
    mesh = keras.distribution.DeviceMesh((2,), ["model"], devices[:2])
    layout = keras.distribution.TensorLayout(("model", None), mesh)
    variable = keras.Variable(np.ones((4, 3), "float32"), layout=layout)
    assert _common.variable_layout(variable) is layout, (
        f"{KERAS}'s variables no longer keep their layout as `_layout`; "
        "keras_soma reads it there, as Keras's add_variable_from_reference "
        "does, to lay out optimizer state like its variable "
        "(keras_soma/_common.py variable_layout) — update it"
    )
    assert _common.axis_layout(layout, 0).axes == ("model",)


def test_add_optimizer_variables_skips_overwritten_variables():
    plain = keras.Variable(np.ones((2, 3), "float32"), name="plain")
    overwritten = keras.Variable(np.ones((4,), "float32"), name="overwritten")
    overwritten.overwrite_with_gradient = True
    optimizer = REGISTRY["Soma"].cls()
    if not _base._HAS_ADD_OPTIMIZER_VARIABLES:
        # Keras before 3.10: add_slot's own check stands in for the helper.
        assert optimizer.add_slot(overwritten, "probe") is None
        assert tuple(optimizer.add_slot(plain, "probe").shape) == (2, 3)
        return
    helper = keras.optimizers.Optimizer.add_optimizer_variables
    assert parameter_names(helper)[:3] == [
        "trainable_variables",
        "name",
        "initializer",
    ], (
        f"{KERAS} changed Optimizer.add_optimizer_variables to take "
        f"{parameter_names(helper)}; keras_soma's add_slot calls it "
        "(keras_soma/_base.py) — update it"
    )
    state = optimizer.add_optimizer_variables([plain, overwritten], "probe")
    assert state[1] is None, (
        f"{KERAS}'s Optimizer.add_optimizer_variables now creates state for a "
        "variable with overwrite_with_gradient=True, which keras_soma's "
        "add_slot gives none elsewhere (keras_soma/_base.py) — make them agree"
    )
    assert tuple(state[0].shape) == (2, 3)
    assert keras.backend.standardize_dtype(state[0].dtype) == "float32"


@requires_tensorflow
def test_tensorflow_op_determinism_flag_is_readable():
    from tensorflow.python.framework import config

    assert callable(getattr(config, "is_op_determinism_enabled", None)), (
        "TensorFlow no longer has tensorflow.python.framework.config."
        "is_op_determinism_enabled; keras_soma reads it to keep fused XLA "
        "kernels off under op determinism (keras_soma/_fused.py) — update it"
    )
    assert _fused._op_determinism_enabled() is False
    config.enable_op_determinism()
    try:
        assert _fused._op_determinism_enabled() is True
    finally:
        config.disable_op_determinism()
    assert _fused._op_determinism_enabled() is False
