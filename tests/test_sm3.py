"""SM3-specific behaviour: memory, slots by rank, edge-case gradients, the
difference between the variants, and the row path for tf.IndexedSlices.

The update rule itself is checked against `keras_soma._reference` by
`test_reference.py` (SM3's registry row); the row path is checked here
against `_reference.sm3_sparse_step`.
"""

from __future__ import annotations

import os
import re
import sys

import keras
import numpy as np
import pytest
from conftest import requires_jax, requires_tensorflow, requires_torch
from helpers import (
    assert_refused_changing_nothing,
    compiled_step_memory,
    make_stepper,
    modes_for_backend,
    op_determinism,
    to_numpy,
)

import keras_soma
from keras_soma import _quantize, _reference, _sm3_blocked
from keras_soma.memory import optimizer_state_bytes, state_bytes_per_parameter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
import fashion_mnist_common  # noqa: E402

SHAPES = [(), (7,), (5, 3), (2, 3, 2, 4)]


def fused_for(mode):
    """The `fused` argument of a mode (see helpers.MODES)."""
    return False if mode == "compiled_unfused" else None


def slot_values(optimizer, variable):
    return {
        name: to_numpy(value) for name, value in optimizer.get_slots(variable).items()
    }


# ---------------------------------------------------------------------------
# Memory and state
# ---------------------------------------------------------------------------


def accumulator_numbers(variables):
    """The cover's size: one number per index of each axis for rank >= 2,
    one per element for rank 0 and 1."""
    total = 0
    for variable in variables:
        shape = tuple(variable.shape)
        total += sum(shape) if len(shape) >= 2 else int(np.prod(shape, dtype=np.int64))
    return total


@pytest.mark.parametrize(
    "build_model,limit",
    [
        # 1,380 float32 numbers for 109,386 parameters: 0.0505 bytes per
        # parameter. The three biases alone (202 numbers, full-size by
        # design) take it past the 0.05; see docs/sm3.md.
        (fashion_mnist_common.build_mlp, 0.0505),
        # 9,857 numbers for 1,199,882 parameters: 0.033.
        (fashion_mnist_common.build_cnn, 0.05),
    ],
    ids=["mlp", "cnn"],
)
def test_state_without_momentum_is_the_cover_only(build_model, limit):
    model = build_model()
    optimizer = keras_soma.SM3(momentum=0.0)
    optimizer.build(model.trainable_variables)
    expected_bytes = 4 * accumulator_numbers(model.trainable_variables)
    assert optimizer_state_bytes(optimizer) == expected_bytes
    per_parameter = state_bytes_per_parameter(optimizer, model.trainable_variables)
    assert per_parameter <= limit
    adam = keras.optimizers.Adam()
    adam.build(model.trainable_variables)
    assert (
        per_parameter < state_bytes_per_parameter(adam, model.trainable_variables) / 150
    )


def test_momentum_zero_allocates_no_momentum_tensor():
    model = fashion_mnist_common.build_mlp()
    without = keras_soma.SM3(momentum=0.0)
    without.build(model.trainable_variables)
    with_momentum = keras_soma.SM3(momentum=0.9)
    with_momentum.build(model.trainable_variables)
    for variable in model.trainable_variables:
        assert "momentum" not in without.get_slots(variable)
        momentum = with_momentum.get_slots(variable)["momentum"]
        assert tuple(momentum.shape) == tuple(variable.shape)
    # No state variable of a kernel's size exists at all.
    assert all(len(state.shape) <= 1 for state in without.variables)
    assert not any("momentum" in state.name for state in without.variables)
    assert len(with_momentum.variables) == len(without.variables) + len(
        model.trainable_variables
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"rank{len(shape)}")
def test_slots_by_rank(shape, dtype):
    variable = keras.Variable(np.zeros(shape), dtype=dtype)
    optimizer = keras_soma.SM3()
    optimizer.build([variable])
    slots = optimizer.get_slots(variable)
    if len(shape) >= 2:
        expected = {f"accumulator_{axis}": (size,) for axis, size in enumerate(shape)}
    else:
        expected = {"accumulator": shape}
    expected["momentum"] = shape
    assert {name: tuple(value.shape) for name, value in slots.items()} == expected
    for name, value in slots.items():
        wanted = dtype if name == "momentum" else "float32"
        assert keras.backend.standardize_dtype(value.dtype) == wanted, name


# ---------------------------------------------------------------------------
# Edge-case gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", modes_for_backend())
@pytest.mark.parametrize(
    "case",
    [{}, {"variant": "I"}, {"momentum": 0.0}, {"beta_2": 0.9}],
    ids=["defaults", "variant-I", "momentum-0", "beta_2-0.9"],
)
def test_zero_gradient_at_first_step_changes_nothing(case, mode):
    rng = np.random.default_rng(0)
    variables = [
        keras.Variable(rng.standard_normal(shape).astype("float32")) for shape in SHAPES
    ]
    initial = [to_numpy(variable).copy() for variable in variables]
    optimizer = keras_soma.SM3(learning_rate=0.5, fused=fused_for(mode), **case)
    optimizer.build(variables)
    step = make_stepper(optimizer, variables, mode)
    step([np.zeros(shape, "float32") for shape in SHAPES])
    assert int(to_numpy(optimizer.iterations)) == 1
    for variable, before in zip(variables, initial):
        np.testing.assert_array_equal(to_numpy(variable), before)
        for name, value in slot_values(optimizer, variable).items():
            assert not value.any(), name


EXTREME_VALUES = np.array(
    [1e30, -1e30, 3.4e38, 1e-40, -1e-40, 1e-20, 1e-30, 0.0, 3.0, -2.0, 1e10, 0.5],
    "float32",
)


@pytest.mark.parametrize("mode", modes_for_backend())
@pytest.mark.parametrize("beta_2", [1.0, 0.9])
@pytest.mark.parametrize("variant", ["I", "II"])
def test_extreme_finite_gradients_stay_finite_and_bounded(variant, beta_2, mode):
    learning_rate = 0.1
    shapes = [(), (12,), (3, 4), (2, 3, 2)]
    variables = [keras.Variable(np.zeros(shape, "float32")) for shape in shapes]
    optimizer = keras_soma.SM3(
        learning_rate=learning_rate,
        momentum=0.0,
        beta_2=beta_2,
        variant=variant,
        fused=fused_for(mode),
    )
    optimizer.build(variables)
    step = make_stepper(optimizer, variables, mode)
    rng = np.random.default_rng(1)
    # |u| <= 1 for sums, 1 / sqrt(1 - beta_2) for averages (nu >= (1 -
    # beta_2) g^2), so no step moves a parameter by more than lr * bound.
    bound = learning_rate * (1.0 if beta_2 == 1.0 else 1.0 / np.sqrt(1.0 - beta_2))
    for index in range(4):
        gradients = [
            rng.permutation(EXTREME_VALUES)[: int(np.prod(shape))].reshape(shape)
            if index % 2 == 0
            else rng.choice(EXTREME_VALUES, size=shape)
            for shape in shapes
        ]
        if index == 0:
            gradients[0] = np.asarray(1e30, "float32")
        before = [to_numpy(variable).copy() for variable in variables]
        step(gradients)
        for variable, previous in zip(variables, before):
            value = to_numpy(variable)
            assert np.isfinite(value).all()
            assert np.abs(value - previous).max(initial=0.0) <= bound * (1 + 1e-6)
            for name, state in slot_values(optimizer, variable).items():
                assert np.isfinite(state).all(), name
        if index == 0:
            # The scalar's first gradient 1e30 squares past float32; the
            # exact step g / sqrt(g^2 / (1 - beta_2)) is still taken.
            np.testing.assert_allclose(to_numpy(variables[0]), -bound, rtol=1e-6)


@pytest.mark.parametrize("mode", modes_for_backend())
def test_scalar_variable_converges(mode):
    variable = keras.Variable(0.0)
    optimizer = keras_soma.SM3(learning_rate=1.0, momentum=0.0, fused=fused_for(mode))
    optimizer.build([variable])
    step = make_stepper(optimizer, [variable], mode)
    distances = []
    for _ in range(100):
        value = float(to_numpy(variable))
        distances.append(abs(value - 3.0))
        step([np.asarray(2.0 * (value - 3.0), "float32")])  # d/dx (x - 3)^2
    assert tuple(optimizer.get_slots(variable)["accumulator"].shape) == ()
    assert distances[-1] < 0.05 * distances[0]


# ---------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------


def one_step(variant, gradient, **kwargs):
    variable = keras.Variable(np.zeros(gradient.shape, "float32"))
    optimizer = keras_soma.SM3(
        learning_rate=1.0, momentum=0.0, variant=variant, **kwargs
    )
    optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])
    return to_numpy(variable), slot_values(optimizer, variable)


def test_variants_on_one_step_by_hand():
    gradient = np.array([[3.0, 1.0], [0.0, 4.0]], "float32")
    # II: nu = 0 + g^2 = [[9, 1], [0, 16]], u = g / sqrt(nu) = [[1, 1], [0, 1]].
    # I: row maxima of g^2 [9, 16], column maxima [9, 16];
    #    nu = min(row, column) = [[9, 9], [9, 16]], u = [[1, 1/3], [0, 1]].
    # Both keep the row and column maxima of nu / g^2: [9, 16], [9, 16].
    # With lr = 1 and no momentum, theta = -u.
    for variant, expected in [
        ("II", [[-1.0, -1.0], [0.0, -1.0]]),
        ("I", [[-1.0, -1.0 / 3.0], [0.0, -1.0]]),
    ]:
        value, slots = one_step(variant, gradient)
        np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=variant)
        np.testing.assert_allclose(slots["accumulator_0"], [9.0, 16.0], err_msg=variant)
        np.testing.assert_allclose(slots["accumulator_1"], [9.0, 16.0], err_msg=variant)


def test_variants_agree_on_vectors_and_scalars():
    rng = np.random.default_rng(2)
    for shape in [(), (9,)]:
        gradient = rng.standard_normal(shape).astype("float32")
        value_one, slots_one = one_step("I", gradient)
        value_two, slots_two = one_step("II", gradient)
        np.testing.assert_array_equal(value_one, value_two)
        np.testing.assert_array_equal(
            slots_one["accumulator"], slots_two["accumulator"]
        )


def test_variant_two_bound_is_tighter_and_both_bound_the_sums():
    rng = np.random.default_rng(3)
    shape = (6, 5, 4)
    variables = {
        variant: keras.Variable(np.zeros(shape, "float32")) for variant in ("I", "II")
    }
    optimizers = {
        variant: keras_soma.SM3(momentum=0.0, variant=variant)
        for variant in ("I", "II")
    }
    sum_of_squares = np.zeros(shape, "float64")
    for _ in range(8):
        # Rows of very different scales, as in an activation pattern.
        gradient = (
            rng.standard_normal(shape) * rng.uniform(0.1, 3.0, (6, 1, 1))
        ).astype("float32")
        sum_of_squares += gradient.astype("float64") ** 2
        for variant in ("I", "II"):
            optimizers[variant].apply(
                [keras.ops.convert_to_tensor(gradient)], [variables[variant]]
            )
    covers = {}
    for variant in ("I", "II"):
        slots = slot_values(optimizers[variant], variables[variant])
        broadcast = [
            slots[f"accumulator_{axis}"].reshape(
                [-1 if other == axis else 1 for other in range(3)]
            )
            for axis in range(3)
        ]
        covers[variant] = np.minimum(
            np.minimum(broadcast[0], broadcast[1]), broadcast[2]
        )
        # The SM3 guarantee: the cover's minimum bounds every element's sum.
        assert (covers[variant] >= sum_of_squares * (1 - 1e-5)).all(), variant
    for axis in range(3):
        one = slot_values(optimizers["I"], variables["I"])[f"accumulator_{axis}"]
        two = slot_values(optimizers["II"], variables["II"])[f"accumulator_{axis}"]
        assert (two <= one * (1 + 1e-6)).all()
    assert (covers["II"] < covers["I"] * (1 - 1e-3)).any()


def test_argument_messages_name_the_range():
    for kwargs, text in [
        (
            {"variant": "III"},
            "Argument `variant` must be one of 'I', 'II'; received: variant='III'",
        ),
        (
            {"momentum": 1.0},
            "Argument `momentum` must be a number in [0, 1); received: momentum=1.0",
        ),
        (
            {"beta_2": 0.0},
            "Argument `beta_2` must be a number in (0, 1]; received: beta_2=0.0",
        ),
        (
            {"epsilon": -1.0},
            "Argument `epsilon` must be a number in [0, inf); received: epsilon=-1.0",
        ),
        (
            {"learning_rate": 0.0},
            "Argument `learning_rate` must be a number in (0, inf)",
        ),
    ]:
        with pytest.raises(ValueError) as raised:
            keras_soma.SM3(**kwargs)
        assert text in str(raised.value)


# ---------------------------------------------------------------------------
# The row path (tf.IndexedSlices)
# ---------------------------------------------------------------------------

ROW_CASES = [
    {},
    {"variant": "I"},
    {"momentum": 0.0},
    {"beta_2": 0.9, "variant": "I"},
    {"weight_decay": 0.1},
]


def row_stepper(optimizer, variable, mode):
    import tensorflow as tf

    dense_shape = tf.constant(tuple(variable.shape), "int64")

    def apply(values, indices):
        gradient = tf.IndexedSlices(values, indices, dense_shape)
        optimizer.apply([gradient], [variable])

    if mode == "eager":
        return apply
    return tf.function(apply)


@requires_tensorflow
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize(
    "shape", [(40,), (40, 6), (40, 3, 2)], ids=lambda s: f"rank{len(s)}"
)
@pytest.mark.parametrize(
    "case",
    ROW_CASES,
    ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()) or "defaults",
)
def test_row_path_matches_its_reference_and_leaves_the_rest_alone(case, shape, mode):
    rng = np.random.default_rng(4)
    learning_rate = 0.05
    initial = rng.standard_normal(shape).astype("float32")
    variable = keras.Variable(initial)
    optimizer = keras_soma.SM3(learning_rate=learning_rate, **case)
    optimizer.build([variable])
    # Give the state non-zero values first, so that "untouched" means
    # something for every slot.
    optimizer.apply(
        [keras.ops.convert_to_tensor(rng.standard_normal(shape).astype("float32"))],
        [variable],
    )
    expected_variable = to_numpy(variable).copy()
    expected_state = slot_values(optimizer, variable)
    dense_state = {name: value.copy() for name, value in expected_state.items()}
    dense_variable = expected_variable.copy()
    step = row_stepper(optimizer, variable, mode)
    reference_args = {
        key: value for key, value in case.items() if key != "weight_decay"
    }
    touched = set()
    for _ in range(4):
        # Repeated rows: their gradients are summed first.
        indices = rng.choice(np.arange(0, 30), size=7)
        indices[1] = indices[0]
        values = rng.standard_normal((7,) + shape[1:]).astype("float32")
        step(values, indices)
        touched.update(int(index) for index in indices)
        expected_variable, expected_state = _reference.sm3_sparse_step(
            expected_variable,
            indices,
            values,
            expected_state,
            learning_rate,
            weight_decay=case.get("weight_decay"),
            **reference_args,
        )
        np.testing.assert_allclose(
            to_numpy(variable), expected_variable, rtol=2e-6, atol=2e-6
        )
        actual_state = slot_values(optimizer, variable)
        assert sorted(actual_state) == sorted(expected_state)
        for name, value in expected_state.items():
            np.testing.assert_allclose(
                actual_state[name], value, rtol=2e-6, atol=2e-6, err_msg=name
            )
    untouched = np.array(sorted(set(range(shape[0])) - touched))
    assert len(untouched) > 10
    state = slot_values(optimizer, variable)
    np.testing.assert_array_equal(
        to_numpy(variable)[untouched], dense_variable[untouched]
    )
    for name, value in state.items():
        if name in ("accumulator", "accumulator_0", "momentum"):
            np.testing.assert_array_equal(
                value[untouched], dense_state[name][untouched], err_msg=name
            )
        else:
            # The other axes' accumulators are not part of the row path.
            np.testing.assert_array_equal(value, dense_state[name], err_msg=name)


@requires_tensorflow
def test_row_path_reads_and_writes_no_full_size_tensor():
    import tensorflow as tf

    rows = 1009  # a prime no other dimension of the traced step equals
    variable = keras.Variable(np.zeros((rows, 4), "float32"))
    optimizer = keras_soma.SM3(learning_rate=0.1)
    optimizer.build([variable])

    @tf.function
    def step(values, indices):
        optimizer.apply(
            [tf.IndexedSlices(values, indices, tf.constant([rows, 4], "int64"))],
            [variable],
        )

    graph = step.get_concrete_function(
        tf.TensorSpec((None, 4), "float32"), tf.TensorSpec((None,), "int64")
    ).graph
    full_size = [
        operation.type
        for operation in graph.get_operations()
        for output in operation.outputs
        if output.dtype != tf.resource and output.shape.rank and output.shape[0] == rows
    ]
    assert not full_size
    operation_types = {operation.type for operation in graph.get_operations()}
    assert "ResourceGather" in operation_types
    assert "ResourceScatterUpdate" in operation_types


@requires_tensorflow
def test_embedding_gradient_takes_the_row_path():
    import tensorflow as tf

    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(50, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras_soma.SM3(learning_rate=0.1), loss="mse")
    table = model.layers[0].embeddings
    before = to_numpy(table).copy()
    inputs = np.array([[1, 2, 3], [3, 4, 1]], "int32")
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(model(inputs) ** 2)
    assert isinstance(tape.gradient(loss, table.value), tf.IndexedSlices)
    model.fit(inputs, np.ones((2, 1), "float32"), epochs=3, verbose=0)
    after = to_numpy(table)
    slots = slot_values(model.optimizer, table)
    untouched = np.setdiff1d(np.arange(50), inputs)
    touched = np.unique(inputs)
    np.testing.assert_array_equal(after[untouched], before[untouched])
    assert (after[touched] != before[touched]).any(axis=1).all()
    assert not slots["accumulator_0"][untouched].any()
    assert (slots["accumulator_0"][touched] > 0).all()
    assert not slots["accumulator_1"].any()  # the column cover stays unused


@requires_tensorflow
def test_row_path_skips_nonfinite_steps():
    import tensorflow as tf

    variable = keras.Variable(np.ones((10, 3), "float32"))
    optimizer = keras_soma.SM3(learning_rate=0.1, skip_nonfinite=True)
    optimizer.build([variable])
    values = np.ones((2, 3), "float32")
    values[1, 2] = np.nan
    optimizer.apply(
        [tf.IndexedSlices(tf.constant(values), tf.constant([1, 4]))], [variable]
    )
    np.testing.assert_array_equal(to_numpy(variable), np.ones((10, 3)))
    assert int(to_numpy(optimizer.skipped_steps)) == 1
    for name, value in slot_values(optimizer, variable).items():
        assert not value.any(), name


# ---------------------------------------------------------------------------
# The row-blocked path (variant II, dense, where XLA compiles the update)
# ---------------------------------------------------------------------------


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Makes every variable of rank >= 2 with 4+ rows take the row-blocked
    path, in blocks of a few rows (with a remainder for odd row counts),
    and counts the calls of `sm3_update_blocked` (at trace time)."""
    monkeypatch.setattr(_sm3_blocked, "BLOCK_ELEMENTS", 8)
    monkeypatch.setattr(_sm3_blocked, "MIN_BLOCKED_ELEMENTS", 1)
    monkeypatch.setattr(_sm3_blocked, "MIN_BLOCKED_SHARE", 0)
    calls = []
    original = _sm3_blocked.sm3_update_blocked

    def counted(*args, **kwargs):
        calls.append(kwargs["rows_per_block"])
        return original(*args, **kwargs)

    monkeypatch.setattr(_sm3_blocked, "sm3_update_blocked", counted)
    return calls


BLOCKED_CASES = [
    {},
    {"momentum": 0.0},
    {"beta_2": 0.99, "epsilon": 1e-8},
]


# Where the path is taken: the fused kernel on TensorFlow (compiled), and
# on JAX both under jax.jit and eagerly (lax.fori_loop runs either way).
BLOCKED_MODES = ["compiled"] + (["eager"] if keras.backend.backend() == "jax" else [])
# PyTorch runs every SM3 update whole-tensor (`SM3._rows_per_block`).
requires_blocked_path = pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="no row-blocked SM3 path on PyTorch: the whole-tensor update runs",
)


@requires_blocked_path
@pytest.mark.parametrize("mode", BLOCKED_MODES)
@pytest.mark.parametrize("shape", [(8, 3), (7, 4, 3), (5, 3, 2, 4)], ids=str)
@pytest.mark.parametrize("case", BLOCKED_CASES, ids=str)
def test_blocked_path_matches_reference(tiny_blocks, case, shape, mode):
    # The comparison is the reference test's, every slot after every step.
    from registry import REGISTRY
    from test_reference import run_against_reference

    run_against_reference(REGISTRY["SM3"], case, shape, "float32", mode)
    assert tiny_blocks, "the row-blocked path was not taken"
    assert all(rows < shape[0] for rows in tiny_blocks)


@requires_blocked_path
@pytest.mark.parametrize("mode", BLOCKED_MODES)
@pytest.mark.parametrize(
    "shape,block_size",
    # Rows of 3 in blocks of 2 and 4; blocks of 6 over rows of 4 (three
    # rows a group) with a remainder of two rows and a partial last
    # block; a rank-3 variable.
    [((8, 3), 2), ((8, 3), 4), ((11, 4), 6), ((7, 2, 2), 8)],
    ids=str,
)
def test_int8_momentum_is_requantized_in_the_row_blocks(
    tiny_blocks, monkeypatch, shape, block_size, mode
):
    """An int8 momentum is averaged and requantized block of rows by block
    of rows, each block of rows a run of whole quantization blocks: the
    reference's numbers, and no quantization of the whole momentum."""
    from registry import STATE_FORMATS
    from test_reference import run_against_reference

    quantized_shapes = []
    original = _quantize.quantize_blockwise

    def recorded(values, *args, **kwargs):
        quantized_shapes.append(tuple(values.shape))
        return original(values, *args, **kwargs)

    monkeypatch.setattr(_quantize, "quantize_blockwise", recorded)
    case = {"momentum_dtype": "int8", "block_size": block_size}
    run_against_reference(STATE_FORMATS["SM3-int8"], case, shape, "float32", mode)
    group_rows = _quantize.row_groups(shape, block_size)[0]
    assert tiny_blocks, "the row-blocked path was not taken"
    assert all(rows % group_rows == 0 and rows < shape[0] for rows in tiny_blocks)
    assert quantized_shapes, "the momentum was not requantized"
    assert all(quantized[0] < shape[0] for quantized in quantized_shapes)


@requires_blocked_path
def test_blocked_path_with_weight_decay_and_skipped_steps(tiny_blocks):
    """Weight decay and skip_nonfinite wrap the blocked update as they
    wrap the whole-tensor one: same numbers, and a skipped step changes
    nothing."""
    from registry import REGISTRY
    from test_reference import run_against_reference

    optimizer, variable = run_against_reference(
        REGISTRY["SM3"], {}, (9, 5), "float32", "compiled", weight_decay=0.5
    )
    assert tiny_blocks
    variable = keras.Variable(np.ones((9, 5), "float32"))
    optimizer = keras_soma.SM3(learning_rate=0.1, skip_nonfinite=True)
    optimizer.build([variable])
    step = make_stepper(optimizer, [variable], "compiled")
    gradient = np.ones((9, 5), "float32")
    step([gradient])
    before = to_numpy(variable), slot_values(optimizer, variable)
    gradient[4, 2] = np.inf
    step([gradient])
    np.testing.assert_array_equal(to_numpy(variable), before[0])
    for name, value in slot_values(optimizer, variable).items():
        np.testing.assert_array_equal(value, before[1][name], err_msg=name)
    assert int(to_numpy(optimizer.skipped_steps)) == 1


@requires_blocked_path
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_blocked_and_whole_tensor_paths_agree(tiny_blocks, momentum):
    rng = np.random.default_rng(3)
    initial = rng.standard_normal((11, 6)).astype("float32")
    gradients = [rng.standard_normal((11, 6)).astype("float32") for _ in range(5)]
    results = {}
    for blocked in (None, True, False):
        variable = keras.Variable(initial)
        optimizer = keras_soma.SM3(
            learning_rate=0.05, momentum=momentum, blocked=blocked
        )
        optimizer.build([variable])
        step = make_stepper(optimizer, [variable], "compiled")
        for gradient in gradients:
            step([gradient])
        results[blocked] = (to_numpy(variable), slot_values(optimizer, variable))
    # Traced once by each blocked optimizer: None and True on CPU.
    assert len(tiny_blocks) == 2
    np.testing.assert_array_equal(results[True][0], results[None][0])
    np.testing.assert_allclose(
        results[None][0], results[False][0], rtol=2e-6, atol=2e-6
    )
    assert sorted(results[None][1]) == sorted(results[False][1])
    for name, value in results[None][1].items():
        np.testing.assert_allclose(
            value, results[False][1][name], rtol=2e-6, err_msg=name
        )


def test_block_rows_by_shape():
    block_rows = _sm3_blocked.block_rows
    block_elements = _sm3_blocked.BLOCK_ELEMENTS
    assert block_rows((2048, 2048)) == block_elements // 2048
    assert block_rows((9216, 128)) == block_elements // 128
    assert block_rows((10,)) is None  # rank 1 keeps a full-size accumulator
    assert block_rows((128, 10)) is None  # small: nothing to gain
    assert block_rows((1, 2**20)) is None  # fewer than two blocks of rows
    assert block_rows((3, 2**20)) == 1  # rows larger than a block
    assert block_rows((64, 2**16)) == 1
    # A multiple of `multiple` rows (an int8 momentum's run of whole
    # quantization blocks), or None where two such blocks do not fit.
    assert block_rows((2**17, 3), multiple=256) == (block_elements // 3) // 256 * 256
    assert block_rows((9216, 128), multiple=3) % 3 == 0
    assert block_rows((100_000, 3)) is not None
    assert block_rows((100_000, 3), multiple=2**16) is None


def test_variant_one_and_op_by_op_updates_are_not_blocked(tiny_blocks):
    variable = keras.Variable(np.ones((8, 4), "float32"))
    assert keras_soma.SM3(variant="I")._rows_per_block(variable) is None
    assert keras_soma.SM3(blocked=False)._rows_per_block(variable) is None
    # Outside a compiled function on TensorFlow the update runs op by op;
    # JAX runs the blocked loop eagerly too; other backends have no path.
    if keras.backend.backend() == "jax":
        assert keras_soma.SM3()._rows_per_block(variable) is not None
    else:
        assert keras_soma.SM3()._rows_per_block(variable) is None


def test_share_rule_of_rows_per_block(monkeypatch):
    """The rule itself, on every backend: where the path exists on CPU,
    `blocked=None` blocks a variable of at least 1/16 of
    `total_elements`, `blocked=True` any eligible variable, and an
    unknown total (before build, or a shape not fully known) applies no
    share rule."""
    monkeypatch.setattr(_sm3_blocked, "unavailable_reason", lambda *args: None)
    monkeypatch.setattr(_sm3_blocked, "_on_accelerator", lambda: False)
    shape = (2**10, 2**8)  # 2**18 elements, the smallest blocked size

    def rows(blocked, total):
        return _sm3_blocked.rows_per_block(shape, "II", blocked, None, 1, total)

    assert rows(None, 16 * 2**18) is not None
    assert rows(None, 16 * 2**18 + 1) is None
    assert rows(True, 16 * 2**18 + 1) is not None
    assert rows(None, None) is not None
    assert rows(False, 2**18) is None
    variables = [keras.Variable(np.zeros((4, 3), "float32")) for _ in range(2)]
    assert _sm3_blocked.total_elements(variables) == 24

    class Unknown:
        shape = (None, 3)

    assert _sm3_blocked.total_elements(variables + [Unknown()]) is None


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="JAX takes the path eagerly too, so `_rows_per_block` says it here",
)
def test_default_blocks_only_variables_with_a_sixteenth_of_the_parameters(
    monkeypatch,
):
    """`blocked=None` blocks a variable only where it holds at least
    `MIN_BLOCKED_SHARE` (1/16) of the parameters the optimizer was built
    for: each loop costs compile memory once (on the memory page's
    transformer, 37 blocked variables left 190 MB more resident after the
    first step than none on TensorFlow), and a smaller variable's
    whole-tensor temporary is a small part of the step's peak.
    `blocked=True` blocks every variable the path applies to."""
    assert _sm3_blocked.MIN_BLOCKED_SHARE == 1 / 16
    # On GPU and TPU the default blocks nothing; the rule is that of CPU.
    monkeypatch.setattr(_sm3_blocked, "_on_accelerator", lambda: False)
    # 2**22 and 2**18 elements: the small one holds 1/17 of the total.
    large, small = (2**14, 2**8), (2**10, 2**8)
    variables = [keras.Variable(np.zeros(shape, "float32")) for shape in (large, small)]
    default = keras_soma.SM3()
    # Before build the total is unknown: every eligible variable is blocked.
    assert default._rows_per_block(variables[1]) is not None
    default.build(variables)
    assert default._rows_per_block(variables[0]) is not None
    assert default._rows_per_block(variables[1]) is None
    requested = keras_soma.SM3(blocked=True)
    requested.build(variables)
    assert all(requested._rows_per_block(v) is not None for v in variables)
    # Alone, or with a 1/16 share, the small variable is blocked by default.
    alone = keras_soma.SM3()
    alone.build(variables[1:])
    assert alone._rows_per_block(variables[1]) is not None
    share = keras_soma.SM3()
    share.build(
        variables[1:] + [keras.Variable(np.zeros((15 * 2**10, 2**8), "float32"))]
    )
    assert share._rows_per_block(variables[1]) is not None


@pytest.mark.parametrize("blocked", ["yes", 1.5, 1, 0])
def test_blocked_argument_is_checked(blocked):
    with pytest.raises(
        ValueError, match=r"`blocked` must be None, True or False; received: blocked="
    ):
        keras_soma.SM3(blocked=blocked)


# ---------------------------------------------------------------------------
# blocked=True: the row-blocked path, or a ValueError saying where it exists
# ---------------------------------------------------------------------------


def blocked_refusal(reason):
    """The message refusing `blocked=True`: where the path exists, then
    `reason`."""
    return (
        r"`blocked` can be True only where the row-blocked update exists: "
        r"variant 'II', on TensorFlow where the fused kernel runs .* and on "
        rf"JAX without a Keras distribution\. Here {re.escape(reason)}; "
        r"received: blocked=True"
    )


def refused_build_leaves_nothing(reason, **kwargs):
    """`build` with `blocked=True` (and `kwargs`) raises naming `reason`
    and builds nothing, and so does `apply` (which builds first); with
    `blocked=None` the same optimizer then builds as usual."""
    variable = keras.Variable(np.ones((8, 4), "float32"))
    optimizer = keras_soma.SM3(blocked=True, **kwargs)
    assert_refused_changing_nothing(
        lambda: optimizer.build([variable]),
        blocked_refusal(reason),
        optimizer,
        [variable],
    )
    assert_refused_changing_nothing(
        lambda: optimizer.apply([keras.ops.ones((8, 4))], [variable]),
        blocked_refusal(reason),
        optimizer,
        [variable],
    )
    optimizer.blocked = None
    optimizer.build([variable])
    assert sorted(optimizer.get_slots(variable)) == [
        "accumulator_0",
        "accumulator_1",
        "momentum",
    ]


def test_blocked_true_is_refused_for_variant_one():
    with pytest.raises(ValueError, match=blocked_refusal("variant='I'")):
        keras_soma.SM3(variant="I", blocked=True)


@pytest.mark.skipif(
    keras.backend.backend() in ("tensorflow", "jax"),
    reason="backends without the row-blocked path",
)
def test_blocked_true_is_refused_at_build_on_other_backends():
    refused_build_leaves_nothing(f"the backend is {keras.backend.backend()!r}")


@requires_tensorflow
def test_blocked_true_is_refused_at_build_with_fused_false():
    refused_build_leaves_nothing("fused=False runs the update op by op", fused=False)


@requires_tensorflow
def test_blocked_true_is_refused_at_build_with_op_determinism():
    with op_determinism():
        refused_build_leaves_nothing("op determinism is enabled (no fused kernel)")


@requires_tensorflow
def test_blocked_true_is_refused_at_build_under_tf_distribute():
    import tensorflow as tf

    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        refused_build_leaves_nothing(
            "a tf.distribute strategy is in use (no fused kernel)"
        )


@requires_tensorflow
def test_blocked_true_is_refused_at_apply_in_eager_mode_on_tensorflow():
    """Built (the context of later updates is not known at build time),
    then refused by an eager `apply`, which changes no variable."""
    variable = keras.Variable(np.ones((8, 4), "float32"))
    optimizer = keras_soma.SM3(blocked=True)
    optimizer.build([variable])
    assert_refused_changing_nothing(
        lambda: optimizer.apply([keras.ops.ones((8, 4))], [variable]),
        blocked_refusal(
            "the update runs eagerly, outside any tf.function (no fused kernel)"
        ),
        optimizer,
        [variable],
    )
    assert int(to_numpy(optimizer.iterations)) == 0


@requires_jax
def test_blocked_true_is_refused_at_build_under_a_keras_distribution():
    devices = keras.distribution.list_devices("cpu")
    with keras.distribution.DataParallel(devices=devices).scope():
        refused_build_leaves_nothing("a Keras distribution is set")


@requires_jax
def test_blocked_true_runs_eagerly_on_jax(tiny_blocks):
    rng = np.random.default_rng(5)
    initial = rng.standard_normal((8, 4)).astype("float32")
    gradient = rng.standard_normal((8, 4)).astype("float32")
    variable = keras.Variable(initial)
    optimizer = keras_soma.SM3(learning_rate=0.1, blocked=True)
    optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])
    assert tiny_blocks
    expected, state = _reference.sm3_step(
        initial, gradient, _reference.sm3_init(initial), 0.1, weight_decay=None
    )
    np.testing.assert_allclose(to_numpy(variable), expected, rtol=2e-6, atol=2e-6)
    for name, value in slot_values(optimizer, variable).items():
        np.testing.assert_allclose(value, state[name], rtol=2e-6, err_msg=name)


# ---------------------------------------------------------------------------
# momentum_dtype: the momentum in reduced precision (blockwise int8 as Soma)
# ---------------------------------------------------------------------------


def test_int8_momentum_is_codes_and_scales_at_about_one_byte_per_parameter():
    shape = (384, 640)
    variable = keras.Variable(np.zeros(shape, "float32"))
    optimizer = keras_soma.SM3(momentum_dtype="int8")
    optimizer.build([variable])
    slots = optimizer.get_slots(variable)
    assert sorted(slots) == [
        "accumulator_0",
        "accumulator_1",
        "momentum",
        "momentum_scale",
    ]
    assert keras.backend.standardize_dtype(slots["momentum"].dtype) == "int8"
    assert tuple(slots["momentum"].shape) == shape
    size = shape[0] * shape[1]
    blocks = -(-size // 256)
    assert tuple(slots["momentum_scale"].shape) == (blocks,)
    np.testing.assert_array_equal(to_numpy(slots["momentum_scale"]), np.ones(blocks))
    # One int8 code per parameter, a float32 scale per 256, and the float32
    # accumulators of the rows and the columns: 1.023 here, against 4.007
    # with a float32 momentum.
    expected = 1.0 + 4 * blocks / size + 4 * sum(shape) / size
    measured = state_bytes_per_parameter(optimizer, [variable])
    assert measured == pytest.approx(expected, rel=1e-9)
    assert 1.0 < measured < 1.05
    float32 = keras_soma.SM3()
    float32.build([variable])
    assert state_bytes_per_parameter(float32, [variable]) - measured == pytest.approx(
        3.0 - 4 * blocks / size
    )


@pytest.mark.parametrize(
    "variable_dtype,momentum_dtype,stored",
    [
        ("float32", None, "float32"),
        ("float16", None, "float16"),
        ("float16", "float32", "float32"),
        ("float32", "bfloat16", "bfloat16"),
    ],
)
def test_momentum_dtype_of_the_float_formats(variable_dtype, momentum_dtype, stored):
    # None keeps the momentum in the variable's dtype, as before the
    # argument existed (so saved state keeps loading).
    variable = keras.Variable(np.zeros((4, 3)), dtype=variable_dtype)
    optimizer = keras_soma.SM3(momentum_dtype=momentum_dtype)
    optimizer.build([variable])
    slots = optimizer.get_slots(variable)
    assert "momentum_scale" not in slots
    assert keras.backend.standardize_dtype(slots["momentum"].dtype) == stored


def test_int8_at_momentum_zero_keeps_no_momentum():
    variable = keras.Variable(np.zeros((6, 5), "float32"))
    optimizer = keras_soma.SM3(momentum=0.0, momentum_dtype="int8")
    optimizer.build([variable])
    assert sorted(optimizer.get_slots(variable)) == ["accumulator_0", "accumulator_1"]
    assert optimizer.get_config()["momentum_dtype"] == "int8"


def test_momentum_dtype_and_block_size_messages():
    with pytest.raises(ValueError) as raised:
        keras_soma.SM3(momentum_dtype="uint8")
    message = str(raised.value)
    assert "Argument `momentum_dtype` must be one of" in message
    for valid in ("'float32'", "'bfloat16'", "'float16'", "'int8'"):
        assert valid in message
    assert "received: momentum_dtype='uint8'" in message
    for block_size in (0, -4, 2.5, "256", True, None):
        with pytest.raises(ValueError) as raised:
            keras_soma.SM3(momentum_dtype="int8", block_size=block_size)
        assert (
            "Argument `block_size` must be an integer >= 1; "
            f"received: block_size={block_size!r}"
        ) in str(raised.value)


def test_bfloat16_momentum_leaves_the_multi_tensor_torch_step():
    """The torch multi-tensor step keeps the momentum in place in float32
    or blockwise int8: with a bfloat16 momentum every pair goes to
    `update_step` (checked against the reference on torch by the SM3
    registry row's bfloat16 case), on every backend's code path."""
    variables = [keras.Variable(np.ones((4, 3), "float32"))]
    gradients = [keras.ops.ones((4, 3))]
    optimizer = keras_soma.SM3(momentum_dtype="bfloat16")
    optimizer.build(variables)
    rest = optimizer._torch_update(gradients, variables, 0.1)
    assert [variable for _, variable in rest] == variables


@requires_torch
def test_int8_momentum_takes_the_multi_tensor_torch_step():
    """An int8 momentum is stepped by the multi-tensor torch step (no pair
    left for `update_step`): it moves the variable and rewrites the codes
    and scales in place (its numbers: the SM3-int8 registry row against
    the reference, and tests/test_contract.py's chunk and fused tests)."""
    variables = [keras.Variable(np.ones((4, 3), "float32"))]
    gradients = [
        keras.ops.convert_to_tensor(np.arange(12.0, dtype="float32").reshape(4, 3))
    ]
    optimizer = keras_soma.SM3(momentum_dtype="int8", block_size=5)
    optimizer.build(variables)
    codes_before = keras.ops.convert_to_numpy(optimizer._momentums[0]).copy()
    import torch

    with torch.no_grad():  # as Keras applies gradients
        rest = optimizer._torch_update(gradients, variables, 0.1)
    assert rest == []
    assert not np.array_equal(keras.ops.convert_to_numpy(variables[0]), np.ones((4, 3)))
    codes = keras.ops.convert_to_numpy(optimizer._momentums[0])
    assert codes.dtype == np.int8 and not np.array_equal(codes, codes_before)
    scales = keras.ops.convert_to_numpy(optimizer._momentum_scales[0])
    assert scales.shape == (3,) and np.all(np.isfinite(scales)) and np.all(scales > 0)


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="XLA's memory analysis, read through JAX"
)
def test_blocked_update_overwrites_the_row_accumulator_in_place():
    """The loop over blocks of rows writes the new row accumulator over
    the old one in its carry, after the element-wise pass has read the
    old one, so that a narrow table (rows of 64) needs no temporary of
    the row accumulator's size: measured 0.51 times the row accumulator
    at 65,536 rows (a block's 2**15 elements), against 1.00 when XLA was
    free to run the loop first (it copied the old accumulator) and 2.01
    when the loop wrote a buffer of its own (JAX 0.10 on CPU)."""
    rows = 65_536
    variable = keras.Variable(np.zeros((rows, 64), "float32"))
    optimizer = keras_soma.SM3(momentum=0.0)
    optimizer.build([variable])
    assert optimizer._rows_per_block(variable) is not None

    row_accumulator_bytes = 4 * rows
    temporaries = compiled_step_memory(
        optimizer, [variable], [keras.ops.zeros((rows, 64))]
    ).temp_size_in_bytes
    assert temporaries < 0.75 * row_accumulator_bytes, (
        temporaries / row_accumulator_bytes
    )


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="XLA's memory analysis, read through JAX"
)
@pytest.mark.parametrize("block_size", [256, 64])
def test_int8_momentum_in_row_blocks_needs_less_than_one_variable_of_temporaries(
    block_size,
):
    """Requantized block of rows by block of rows, an int8 momentum needs
    no float32 momentum of the variable's size: XLA's analysis of the
    compiled step (variables and state donated) gives its temporaries at
    0.57 times the largest variable, against 1.86-1.87 for the
    whole-tensor update (measured, JAX 0.10 on CPU)."""
    shapes = [(1024, 512), (512,), (512, 256), (256,)]
    variables = [keras.Variable(np.ones(shape, "float32")) for shape in shapes]
    gradients = [keras.ops.ones(shape) for shape in shapes]
    largest = 1024 * 512 * 4
    temporaries = {}
    for blocked in (None, False):
        optimizer = keras_soma.SM3(
            momentum=0.9, momentum_dtype="int8", block_size=block_size, blocked=blocked
        )
        optimizer.build(variables)
        assert (optimizer._rows_per_block(variables[0]) is None) == (blocked is False)
        temporaries[blocked] = compiled_step_memory(
            optimizer, variables, gradients
        ).temp_size_in_bytes
    assert temporaries[None] < largest < temporaries[False], temporaries


@requires_blocked_path
@pytest.mark.parametrize("mode", BLOCKED_MODES)
def test_int8_momentum_without_two_row_runs_of_whole_blocks_is_not_blocked(
    tiny_blocks, mode
):
    """Rows of 4 in blocks of 256 make runs of 64 rows: a 9-row variable
    has not two of them, so it takes the whole-tensor update (the
    reference's numbers) rather than blocks that would split a
    quantization block."""
    from registry import STATE_FORMATS
    from test_reference import run_against_reference

    spec = STATE_FORMATS["SM3-int8"]
    assert spec.arguments["momentum_dtype"] == "int8"
    run_against_reference(
        spec, {**spec.arguments, "block_size": 256}, (9, 4), "float32", mode
    )
    assert not tiny_blocks
    # The same variable in blocks of 2 (runs of one row) is blocked.
    run_against_reference(
        spec, {**spec.arguments, "block_size": 2}, (9, 4), "float32", mode
    )
    assert tiny_blocks


@requires_tensorflow
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_int8_row_sliced_gradients_take_the_row_path(mode):
    """With an int8 momentum a tf.IndexedSlices gradient still takes the
    row path: the numbers of the row reference (codes exactly), and a row
    without a gradient stays where it is."""
    import tensorflow as tf

    rng = np.random.default_rng(8)
    shape = (6, 4)
    initial = rng.standard_normal(shape).astype("float32")
    variable = keras.Variable(initial)
    optimizer = keras_soma.SM3(0.05, momentum_dtype="int8", block_size=4)
    optimizer.build([variable])
    step = row_stepper(optimizer, variable, mode)
    expected, state = (
        initial,
        _reference.sm3_init(initial, momentum_dtype="int8", block_size=4),
    )
    for step_indices in ([1, 4, 1], [0, 2, 5], [0, 3, 3]):
        indices = np.array(step_indices, "int64")
        values = rng.standard_normal((3, 4)).astype("float32")
        step(tf.constant(values), tf.constant(indices))
        expected, state = _reference.sm3_sparse_step(
            expected, indices, values, state, 0.05, momentum_dtype="int8", block_size=4
        )
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-5, atol=1e-6)
        for name, value in slot_values(optimizer, variable).items():
            if value.dtype == np.int8:
                np.testing.assert_array_equal(value, state[name], err_msg=name)
            else:
                np.testing.assert_allclose(value, state[name], rtol=1e-5, atol=1e-6)
        if step_indices[0] == 1:
            after_first = to_numpy(variable).copy()
    # Row 4 had a gradient at the first step only: the row path leaves it
    # (the dense step would move it with its momentum).
    np.testing.assert_array_equal(to_numpy(variable)[4], after_first[4])
    assert (after_first[4] != initial[4]).all()
