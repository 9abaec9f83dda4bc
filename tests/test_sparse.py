"""Row-sliced gradients, for every optimizer with a row path in
`registry.CONTRACT_ROWS` (`sparse_reference_step`): Soma (int8 included)
and GradSign with `lazy_sparse_updates=True`, SM3 always.

Each backend's sparse form that names whole rows (`helpers.
native_row_gradient`): tf.IndexedSlices on TensorFlow, a BCOO with one
sparse dimension on JAX, a torch sparse COO tensor with one sparse
dimension on torch. The row path is checked against its numpy reference in
`keras_soma._reference`; rows a gradient does not name, and their state,
must come out bit-identical. That the default of the optimizers where the
row path is a choice applies the dense gradient, and that other sparse
forms are made dense, is part of the contract suite
(`test_contract.py`). The graph and `Embedding` tests are TensorFlow's:
only there does Keras itself hand the optimizer a sparse gradient.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import requires_jax, requires_tensorflow
from helpers import (
    TOLERANCE,
    make_row_stepper,
    native_row_gradient,
    sparse_modes,
    to_numpy,
)
from registry import CONTRACT_ROWS, REGISTRY

import keras_soma

SPARSE_SPECS = [
    pytest.param(spec, id=name)
    for name, spec in CONTRACT_ROWS.items()
    if spec.sparse_reference_step is not None
]
# The optimizers whose row path is a choice (`sparse_arguments` selects it).
LAZY_CHOICE_SPECS = [
    pytest.param(spec, id=name)
    for name, spec in CONTRACT_ROWS.items()
    if spec.sparse_arguments
]
ROWS = 40
# Row indices are drawn below this, so rows ROWS_DRAWN..ROWS-1 are never
# touched and every test has untouched rows to check.
ROWS_DRAWN = 30


def case_id(case):
    return "-".join(f"{key}={value}" for key, value in case.items()) or "defaults"


def spec_cases(extra_cases=({"weight_decay": 0.1},)):
    """(spec, constructor arguments) for every row-path optimizer and each
    of its reference cases, plus `extra_cases`."""
    return [
        pytest.param(spec, case, id=f"{spec.name}-{case_id(case)}")
        for spec in (param.values[0] for param in SPARSE_SPECS)
        for case in [*spec.reference_cases, *extra_cases]
    ]


def slot_values(optimizer, variable):
    return {
        name: to_numpy(value) for name, value in optimizer.get_slots(variable).items()
    }


def random_rows(rng, shape, count=7):
    """Row indices below ROWS_DRAWN with a repeat, and their gradients."""
    indices = rng.choice(np.arange(ROWS_DRAWN), size=count)
    indices[1] = indices[0]  # repeated rows are summed first
    values = rng.standard_normal((count,) + tuple(shape[1:])).astype("float32")
    return indices.astype("int64"), values


def warm_start(optimizer, variable, rng):
    """One dense step, so that every row's state is non-zero and "left
    alone" means something."""
    gradient = rng.standard_normal(tuple(variable.shape)).astype("float32")
    optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])


def assert_close(actual, expected, message):
    tolerance = TOLERANCE.get(str(expected.dtype), 0)
    np.testing.assert_allclose(
        actual.astype(np.float64),
        expected.astype(np.float64),
        rtol=tolerance,
        atol=tolerance,
        err_msg=message,
    )


# ---------------------------------------------------------------------------
# The row path against its reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sparse_modes())
@pytest.mark.parametrize("shape", [(ROWS,), (ROWS, 6)], ids=["rank1", "rank2"])
@pytest.mark.parametrize("spec, case", spec_cases())
def test_row_path_matches_reference_and_leaves_other_rows_bit_identical(
    spec, case, shape, mode
):
    rng = np.random.default_rng(4)
    learning_rate = 0.05
    variable = keras.Variable(rng.standard_normal(shape).astype("float32"))
    optimizer = spec.make(learning_rate=learning_rate, **spec.sparse_arguments, **case)
    optimizer.build([variable])
    warm_start(optimizer, variable, rng)
    before_variable = to_numpy(variable).copy()
    before_state = slot_values(optimizer, variable)
    expected_variable = before_variable.copy()
    expected_state = {name: value.copy() for name, value in before_state.items()}
    reference_arguments = {
        k: v for k, v in {**spec.arguments, **case}.items() if k != "weight_decay"
    }
    step = make_row_stepper(optimizer, variable, mode)
    for _ in range(3):
        indices, values = random_rows(rng, shape)
        step(indices, values)
        expected_variable, expected_state = spec.sparse_reference_step(
            expected_variable,
            indices,
            values,
            expected_state,
            learning_rate,
            weight_decay=case.get("weight_decay"),
            **reference_arguments,
        )
        assert_close(to_numpy(variable), expected_variable, "variable")
        state = slot_values(optimizer, variable)
        assert sorted(state) == sorted(expected_state)
        for name, value in expected_state.items():
            assert state[name].dtype == value.dtype, name
            assert_close(state[name], value, name)

    untouched = np.arange(ROWS_DRAWN, ROWS)
    np.testing.assert_array_equal(
        to_numpy(variable)[untouched], before_variable[untouched]
    )
    state = slot_values(optimizer, variable)
    if "momentum_scale" in state:
        # An int8 average is requantized by blocks, which run across rows:
        # the rows untouched and their blocks' scales stay only where no
        # element of their blocks was stepped.
        block_size = optimizer.block_size
        row_size = int(np.prod(shape[1:]))
        blocks = np.arange(ROWS * row_size).reshape(ROWS, row_size) // block_size
        stepped_blocks = np.unique(blocks[:ROWS_DRAWN])
        untouched = untouched[~np.isin(blocks[untouched], stepped_blocks).any(axis=1)]
        left = np.setdiff1d(np.arange(state["momentum_scale"].size), stepped_blocks)
        np.testing.assert_array_equal(
            state["momentum_scale"][left], before_state["momentum_scale"][left]
        )
    for name, value in state.items():
        if value.shape[:1] == (ROWS,):
            np.testing.assert_array_equal(
                value[untouched], before_state[name][untouched], err_msg=name
            )


@requires_tensorflow
@pytest.mark.parametrize("spec", SPARSE_SPECS)
def test_row_path_reads_and_writes_no_full_size_tensor(spec):
    import tensorflow as tf

    rows = 1009  # a prime no other dimension of the traced step equals
    variable = keras.Variable(np.zeros((rows, 4), "float32"))
    optimizer = spec.make(learning_rate=0.1, **spec.sparse_arguments)
    optimizer.build([variable])

    @tf.function
    def step(values, indices):
        gradient = tf.IndexedSlices(values, indices, tf.constant([rows, 4], "int64"))
        optimizer.apply([gradient], [variable])

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


@requires_jax
@pytest.mark.parametrize("spec", SPARSE_SPECS)
def test_jax_compiled_row_path_allocates_nothing_table_sized(spec):
    """On JAX the row path writes the whole value (`.at[rows].set`); compiled
    with the variables donated, XLA does it in place: the step's
    temporaries are those of the rows, not of the table (the dense path
    needs a table-sized one, the densified gradient)."""
    import jax
    import jax.numpy as jnp

    rows, width, touched = 20_000, 16, 64
    table_bytes = rows * width * 4
    variable = keras.Variable(np.zeros((rows, width), "float32"))
    optimizer = spec.make(learning_rate=0.1, **spec.sparse_arguments)
    optimizer.build([variable])

    def step(variable_values, optimizer_values, indices, values):
        gradient = native_row_gradient(indices, values, (rows, width))
        return optimizer.stateless_apply(optimizer_values, [gradient], variable_values)

    analysis = (
        jax.jit(step, donate_argnums=(0, 1))
        .lower(
            [variable.value],
            [value.value for value in optimizer.variables],
            jnp.zeros((touched,), "int32"),
            jnp.zeros((touched, width), "float32"),
        )
        .compile()
        .memory_analysis()
    )
    assert analysis.temp_size_in_bytes < table_bytes // 10, analysis
    # Every variable and state tensor is updated in place.
    assert analysis.output_size_in_bytes - analysis.alias_size_in_bytes < 1024


@pytest.mark.parametrize("mode", sparse_modes())
@pytest.mark.parametrize("spec", SPARSE_SPECS)
def test_row_path_skips_nonfinite_steps(spec, mode):
    variable = keras.Variable(np.ones((10, 3), "float32"))
    optimizer = spec.make(
        learning_rate=0.1, skip_nonfinite=True, **spec.sparse_arguments
    )
    optimizer.build([variable])
    before = slot_values(optimizer, variable)
    values = np.ones((2, 3), "float32")
    values[1, 2] = np.nan
    make_row_stepper(optimizer, variable, mode)(np.array([1, 4]), values)
    np.testing.assert_array_equal(to_numpy(variable), np.ones((10, 3)))
    assert int(to_numpy(optimizer.skipped_steps)) == 1
    for name, value in slot_values(optimizer, variable).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    # The same rows with finite gradients do step (so the check above
    # could fail).
    values[1, 2] = 1.0
    make_row_stepper(optimizer, variable, mode)(np.array([1, 4]), values)
    assert (to_numpy(variable)[[1, 4]] < 1).all()


# ---------------------------------------------------------------------------
# Dense (default) against lazy, where it is a choice
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", LAZY_CHOICE_SPECS)
def test_a_row_without_gradient_moves_only_in_dense_mode(spec):
    """Rows touched once and then not again: the dense default keeps
    moving them (their state decays, but is not zero), the lazy mode does
    not touch them."""
    rows, later_rows = np.array([0, 1, 2]), np.array([3, 4])
    values = np.ones((3, 2), "float32")
    results = {}
    for lazy in (False, True):
        variable = keras.Variable(np.zeros((6, 2), "float32"))
        optimizer = spec.make(learning_rate=0.1, lazy_sparse_updates=lazy)
        step = make_row_stepper(optimizer, variable, "eager")
        step(rows, values)
        after_first = to_numpy(variable).copy()
        step(later_rows, values[:2])
        results[lazy] = (after_first, to_numpy(variable))
    for lazy, (after_first, after_second) in results.items():
        assert (after_first[rows] < 0).all(), lazy  # a positive gradient
        assert (after_second[later_rows] < 0).all(), lazy
        np.testing.assert_array_equal(after_second[5], [0, 0])  # never touched
    dense_first, dense_second = results[False]
    lazy_first, lazy_second = results[True]
    assert (dense_second[rows] < dense_first[rows]).all()
    np.testing.assert_array_equal(lazy_second[rows], lazy_first[rows])


@requires_tensorflow
@pytest.mark.parametrize("spec", LAZY_CHOICE_SPECS)
def test_embedding_fit_with_lazy_rows_leaves_other_rows_alone(spec):
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(50, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(
        optimizer=spec.make(learning_rate=0.05, **spec.sparse_arguments), loss="mse"
    )
    table = model.layers[0].embeddings
    before = to_numpy(table).copy()
    inputs = np.array([[1, 2, 3], [3, 4, 1]], "int32")
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(model(inputs) ** 2)
    assert isinstance(tape.gradient(loss, table.value), tf.IndexedSlices)
    model.fit(inputs, np.ones((2, 1), "float32"), epochs=3, verbose=0)
    after = to_numpy(table)
    touched = np.unique(inputs)
    untouched = np.setdiff1d(np.arange(50), touched)
    np.testing.assert_array_equal(after[untouched], before[untouched])
    assert (after[touched] != before[touched]).any(axis=1).all()
    for name, value in slot_values(model.optimizer, table).items():
        if value.shape[:1] != (50,):
            continue  # int8 block scales: blocks run across rows
        assert not value[untouched].any(), name
        assert value[touched].any(), name


@pytest.mark.parametrize("spec", LAZY_CHOICE_SPECS)
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_lazy_sparse_updates_must_be_a_bool(spec, value):
    with pytest.raises(ValueError) as raised:
        spec.make(lazy_sparse_updates=value)
    message = str(raised.value)
    assert "`lazy_sparse_updates` must be a bool" in message
    assert f"lazy_sparse_updates={value!r}" in message


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(spec, id=name)
        for name, spec in REGISTRY.items()
        if not spec.sparse_arguments
    ],
)
def test_optimizers_without_the_choice_refuse_it(spec):
    with pytest.raises(ValueError, match="has no argument `lazy_sparse_updates`"):
        spec.cls(lazy_sparse_updates=True)
    assert "lazy_sparse_updates" not in spec.cls().get_config()


# ---------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------


def accumulating_specs():
    """Every optimizer on TensorFlow; elsewhere Soma only, whose folded
    accumulation makes the gradient dense itself: Keras's own accumulator
    (GradSign, SM3) fails on a BCOO (its JAX `lax.cond`) or a torch sparse
    tensor."""
    return [
        pytest.param(spec, id=name)
        for name, spec in REGISTRY.items()
        if keras.backend.backend() == "tensorflow" or spec.cls is keras_soma.Soma
    ]


@pytest.mark.parametrize("mode", sparse_modes())
@pytest.mark.parametrize("spec", accumulating_specs())
def test_accumulated_row_gradients_count_nonfinite_micro_steps_as_zero(spec, mode):
    """With `gradient_accumulation_steps` and `skip_nonfinite`, a
    row-sliced micro-gradient holding NaN keeps its sparse form and counts
    as zeros: the same as the dense run with a zero micro-gradient."""
    rng = np.random.default_rng(11)
    shape = (ROWS, 3)
    micro_steps = [random_rows(rng, shape) for _ in range(4)]
    micro_steps[1][1][0, 0] = np.nan

    def dense(indices, values):
        gradient = np.zeros(shape, "float32")
        np.add.at(gradient, indices, values)
        return gradient

    variable = keras.Variable(np.ones(shape, "float32"))
    optimizer = spec.cls(
        learning_rate=0.1, skip_nonfinite=True, gradient_accumulation_steps=2
    )
    optimizer.build([variable])
    step = make_row_stepper(optimizer, variable, mode)
    for indices, values in micro_steps:
        step(indices, values)

    expected = keras.Variable(np.ones(shape, "float32"))
    expected_optimizer = spec.cls(learning_rate=0.1, gradient_accumulation_steps=2)
    expected_optimizer.build([expected])
    for index, (indices, values) in enumerate(micro_steps):
        gradient = np.zeros(shape, "float32") if index == 1 else dense(indices, values)
        expected_optimizer.apply([keras.ops.convert_to_tensor(gradient)], [expected])

    assert int(to_numpy(optimizer.skipped_steps)) == 1
    assert np.isfinite(to_numpy(variable)).all()
    assert not np.array_equal(to_numpy(variable), np.ones(shape))
    assert_close(to_numpy(variable), to_numpy(expected), "variable")
    for name, value in slot_values(expected_optimizer, expected).items():
        assert_close(slot_values(optimizer, variable)[name], value, name)
