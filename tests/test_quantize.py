"""The blockwise int8 momentum (`keras_soma._quantize`), for every
optimizer that offers it (`momentum_dtype="int8"`): its state survives
Keras's saving, and state of another format is refused whole. The
formats' arithmetic is checked against the numpy reference by the
reference and property suites (the registry's int8 rows)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import make_stepper, to_numpy

import keras_soma

OPTIMIZERS = [
    pytest.param(keras_soma.Soma, id="Soma"),
    pytest.param(keras_soma.SM3, id="SM3"),
]


@pytest.mark.parametrize(
    "saved,loading", [("float32", "int8"), ("int8", "float32"), ("bfloat16", "int8")]
)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_state_of_another_momentum_dtype_is_refused_whole(
    optimizer_class, saved, loading
):
    """Loading float32 state into an int8 optimizer, or the reverse,
    raises before anything is assigned."""
    rng = np.random.default_rng(6)
    variables = [
        keras.Variable(rng.standard_normal(shape).astype("float32"))
        for shape in [(6, 4), (4,)]
    ]
    source = optimizer_class(0.01, momentum_dtype=saved)
    source.build(variables)
    step = make_stepper(source, variables, "eager")
    step([rng.standard_normal(tuple(v.shape)).astype("float32") for v in variables])
    store = {}
    source.save_own_variables(store)

    target = optimizer_class(0.01, momentum_dtype=loading)
    target.build(variables)
    before = [to_numpy(v).copy() for v in target.variables]
    with pytest.raises(ValueError, match="Cannot load optimizer state"):
        target.load_own_variables(store)
    for value, old in zip(target.variables, before):
        np.testing.assert_array_equal(to_numpy(value), old)


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_int8_state_survives_keras_save_and_load(optimizer_class, tmp_path):
    rng = np.random.default_rng(7)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=optimizer_class(0.01, momentum_dtype="int8", block_size=4),
        loss="mse",
    )
    inputs = rng.standard_normal((32, 5)).astype("float32")
    targets = rng.standard_normal((32, 3)).astype("float32")
    model.fit(inputs, targets, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    config = restored.optimizer.get_config()
    assert config["momentum_dtype"] == "int8" and config["block_size"] == 4
    for variable, twin in zip(model.trainable_variables, restored.trainable_variables):
        original = model.optimizer.get_slots(variable)
        loaded = restored.optimizer.get_slots(twin)
        assert "momentum_scale" in original and sorted(original) == sorted(loaded)
        for name in original:
            np.testing.assert_array_equal(
                to_numpy(loaded[name]), to_numpy(original[name])
            )
            assert to_numpy(original[name]).any(), name


def test_quantize_with_scales_is_quantize_blockwise_after_its_maximum():
    """`quantize_with_scales` (what `benchmarks/int8_step_parts.py` times
    without the block maximum) rounds as `quantize_blockwise` given the
    blocks' own maxima, and saturates at +-127 against smaller scales."""
    from keras_soma import _quantize

    rng = np.random.default_rng(2)
    values = rng.standard_normal((3, 40)).astype(np.float32)
    values[0, 3] = np.nan
    for code in _quantize.CODES:
        codes, scales = _quantize.quantize_blockwise(values, 16, code=code)
        again = _quantize.quantize_with_scales(values, scales, 16, code=code)
        np.testing.assert_array_equal(to_numpy(again), to_numpy(codes))
        halved = to_numpy(
            _quantize.quantize_with_scales(values, scales / 2, 16, code=code)
        )
        assert np.abs(halved).max() == 127
        assert np.all(np.abs(halved) >= np.abs(to_numpy(codes)))


@pytest.mark.parametrize("block_size", [1, 3, 6, 8, 12, 64, 256])
def test_block_absmax_is_each_blocks_largest_magnitude(block_size):
    """`block_absmax` folds rows onto themselves on the XLA backends
    before reducing; its result is the plain maximum whatever the block
    size (odd, or not a power of two, where folding stops early)."""
    from keras_soma import _quantize

    rng = np.random.default_rng(block_size)
    blocked = rng.standard_normal((5, block_size)).astype(np.float32)
    blocked[1] = -np.abs(blocked[1])  # a block of negatives only
    blocked[2] = 0.0
    got = to_numpy(_quantize.block_absmax(keras.ops.convert_to_tensor(blocked)))
    np.testing.assert_array_equal(got, np.abs(blocked).max(axis=1))


@pytest.mark.parametrize(
    "shape, block_size",
    [((40, 6), 4), ((40,), 256), ((5, 512), 256), ((9, 64), 256), ((7, 3, 5), 6)],
)
def test_row_groups_are_runs_of_whole_rows_and_whole_blocks(shape, block_size):
    """`row_groups` (the int8 lazy row path's unit): the smallest number
    of rows whose elements are also whole blocks, so no block holds
    elements of two groups."""
    from keras_soma import _quantize

    rows, blocks = _quantize.row_groups(shape, block_size)
    row_size = int(np.prod(shape[1:]))
    assert rows * row_size == blocks * block_size
    group_of_element = np.arange(shape[0] * row_size) // (rows * row_size)
    block_of_element = np.arange(shape[0] * row_size) // block_size
    for block in np.unique(block_of_element):
        assert len(np.unique(group_of_element[block_of_element == block])) == 1
    # No smaller run of rows ends on a block boundary.
    assert all((fewer * row_size) % block_size for fewer in range(1, rows))
