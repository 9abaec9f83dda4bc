"""Soma-specific behaviour beyond the shared contract and reference tests."""

import keras
import numpy as np
import pytest
from conftest import requires_torch
from helpers import make_stepper, modes_for_backend, random_gradient, to_numpy

import keras_soma
from keras_soma import _reference
from keras_soma.memory import state_bytes_per_parameter


def stepped(optimizer, start, gradients, mode="eager"):
    variable = keras.Variable(np.asarray(start, "float32"), name="weights")
    optimizer.build([variable])
    step = make_stepper(optimizer, [variable], mode)
    for gradient in gradients:
        step([np.asarray(gradient, "float32")])
    return variable


@pytest.mark.parametrize("momentum", [0.5, 0.95])  # Lion refuses beta = 0
def test_equals_keras_lion_with_equal_betas(momentum):
    """The paper check: Lion(lr, beta_1=b, beta_2=b) computes Soma's update."""
    rng = np.random.default_rng(0)
    start = rng.standard_normal((6, 4))
    gradients = [random_gradient(rng, (6, 4)) for _ in range(10)]
    soma = stepped(keras_soma.Soma(0.01, momentum=momentum), start, gradients)
    lion = stepped(
        keras.optimizers.Lion(0.01, beta_1=momentum, beta_2=momentum),
        start,
        gradients,
    )
    np.testing.assert_allclose(to_numpy(soma), to_numpy(lion), rtol=1e-6)
    assert not np.allclose(to_numpy(soma), start)


def test_momentum_zero_is_sign_sgd():
    rng = np.random.default_rng(1)
    start = rng.standard_normal((5,))
    gradient = random_gradient(rng, (5,))
    variable = stepped(keras_soma.Soma(0.1, momentum=0.0), start, [gradient])
    np.testing.assert_allclose(
        to_numpy(variable), start - 0.1 * np.sign(gradient), rtol=1e-6
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_momentum_is_stored_in_that_dtype(dtype):
    variable = keras.Variable(np.zeros((3, 3), "float32"))
    optimizer = keras_soma.Soma(momentum_dtype=dtype)
    optimizer.build([variable])
    slot = optimizer.get_slots(variable)["momentum"]
    assert keras.backend.standardize_dtype(slot.dtype) == dtype
    assert tuple(slot.shape) == (3, 3)


@pytest.mark.parametrize("mode", modes_for_backend())
def test_nan_gradient_poisons_the_parameter_without_skip(mode):
    gradient = np.array([np.nan, 1.0, -1.0], "float32")
    variable = stepped(keras_soma.Soma(0.1), np.zeros(3), [gradient], mode)
    values = to_numpy(variable)
    assert np.isnan(values[0])
    np.testing.assert_allclose(values[1:], [-0.1, 0.1])


@pytest.mark.parametrize("mode", modes_for_backend())
def test_inf_gradient_sticks_the_direction_without_skip(mode):
    """+Inf makes the average +Inf for good: the parameter keeps moving
    down by lr, whatever later (finite) gradients say."""
    gradients = [[np.inf], [-1.0], [-1.0]]
    optimizer = keras_soma.Soma(0.1)
    variable = stepped(optimizer, [0.0], gradients, mode)
    np.testing.assert_allclose(to_numpy(variable), [-0.3], rtol=1e-6)
    assert np.isposinf(to_numpy(optimizer.get_slots(variable)["momentum"])[0])


@pytest.mark.parametrize("mode", modes_for_backend())
def test_skip_nonfinite_leaves_everything_untouched_and_counts(mode):
    rng = np.random.default_rng(2)
    start = rng.standard_normal((4,))
    good = [random_gradient(rng, (4,)) for _ in range(3)]
    bad = good[0].copy()
    bad[2] = np.nan
    optimizer = keras_soma.Soma(0.1, skip_nonfinite=True, weight_decay=0.1)
    variable = keras.Variable(start.astype("float32"))
    optimizer.build([variable])
    step = make_stepper(optimizer, [variable], mode)

    step([good[0]])
    before = to_numpy(variable).copy()
    state_before = to_numpy(optimizer.get_slots(variable)["momentum"]).copy()
    step([bad])
    np.testing.assert_array_equal(to_numpy(variable), before)
    np.testing.assert_array_equal(
        to_numpy(optimizer.get_slots(variable)["momentum"]), state_before
    )
    assert int(to_numpy(optimizer.skipped_steps)) == 1
    step([good[1]])
    assert int(to_numpy(optimizer.skipped_steps)) == 1

    # The same run without the bad step, by the reference.
    expected, state = start.astype("float32"), _reference.soma_init(start)
    for gradient in good[:2]:
        expected, state = _reference.soma_step(
            expected, gradient, state, 0.1, weight_decay=0.1
        )
    np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)


def test_skipped_steps_is_none_when_option_is_off():
    assert keras_soma.Soma().skipped_steps is None


# ---------------------------------------------------------------------------
# Gradient accumulation folded into the average
# ---------------------------------------------------------------------------

# 0-D to 3-D variables, trained together (global_clipnorm spans them all).
ACCUMULATION_SHAPES = [(), (5,), (4, 3), (2, 3, 2)]
WINDOWS = 3


def accumulation_modes():
    """Eager and traced (tf.function with and without the fused kernel,
    jax.jit over stateless_apply); torch runs eagerly."""
    if keras.backend.backend() == "torch":
        return ["eager"]
    return modes_for_backend()


def nonfinite_gradients(rng, shapes, count, bad_steps):
    """`count` micro-steps of gradients; at the micro-steps `bad_steps`
    one element of one variable is NaN or Inf."""
    steps = [[random_gradient(rng, shape) for shape in shapes] for _ in range(count)]
    for position, index in enumerate(bad_steps):
        gradient = steps[index][position % len(shapes)]
        gradient.reshape(-1)[0] = np.nan if position % 2 == 0 else np.inf
    return steps


def accumulating_optimizer(steps, mode, **kwargs):
    if mode == "compiled_unfused":
        kwargs["fused"] = False
    return keras_soma.Soma(
        gradient_accumulation_steps=None if steps == 1 else steps, **kwargs
    )


ACCUMULATION_CASES = [
    {},
    {"weight_decay": 0.3},
    {"clipnorm": 0.5},
    {"global_clipnorm": 0.8},
    {"clipvalue": 0.2, "momentum": 0.5},
    {"skip_nonfinite": True, "weight_decay": 0.3},
    {"skip_nonfinite": True, "global_clipnorm": 0.8},
]


def assert_averages(optimizer, variables, states, rtol, when):
    """Each variable's stored average against its reference state."""
    for variable, state in zip(variables, states):
        np.testing.assert_allclose(
            to_numpy(optimizer.get_slots(variable)["momentum"]),
            state["momentum"],
            rtol=rtol,
            atol=1e-7,
            err_msg=f"average of {variable.path} {when}",
        )


@pytest.mark.parametrize("mode", accumulation_modes())
@pytest.mark.parametrize("case", ACCUMULATION_CASES, ids=lambda c: str(c) or "plain")
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_accumulation_matches_reference(steps, case, mode):
    """Three windows against `_reference.soma_accumulated_steps`: the
    variables move at each window's last micro-step only, and then they
    and the averages equal Keras's accumulate-then-step."""
    rng = np.random.default_rng(steps)
    starts = [
        rng.standard_normal(shape).astype("float32") for shape in ACCUMULATION_SHAPES
    ]
    count = WINDOWS * steps
    # Non-finite micro-steps at a window's start, middle and end (without
    # accumulation: one step of three).
    bad = sorted({0, count // 2, count - 1}) if steps > 1 else [1]
    if not case.get("skip_nonfinite"):
        bad = []
    gradients = nonfinite_gradients(rng, ACCUMULATION_SHAPES, count, bad)
    variables = [
        keras.Variable(start, name=f"weights_{index}")
        for index, start in enumerate(starts)
    ]
    optimizer = accumulating_optimizer(steps, mode, learning_rate=0.01, **case)
    optimizer.build(variables)
    step = make_stepper(optimizer, variables, mode)
    reference_case = {
        key: value for key, value in case.items() if key != "skip_nonfinite"
    }

    # Without clipping the micro-steps fold into the average: it is
    # checked after every micro-step against `_reference.soma_micro_step`
    # (with clipping Soma keeps Keras's accumulator).
    clipping = {"clipnorm", "clipvalue", "global_clipnorm"} & set(case)
    folds = steps > 1 and not clipping
    folded = [_reference.soma_init(start) for start in starts]
    before = starts
    for index, micro_gradients in enumerate(gradients):
        step(micro_gradients)
        if folds:
            finite = all(np.isfinite(gradient).all() for gradient in micro_gradients)
            folded = [
                _reference.soma_micro_step(
                    start,
                    gradient if finite else np.zeros_like(gradient),
                    state,
                    0.01,
                    accumulation_steps=steps,
                    starts=index % steps == 0,
                )[1]
                for start, gradient, state in zip(starts, micro_gradients, folded)
            ]
            assert_averages(
                optimizer, variables, folded, 1e-6, f"after micro-step {index}"
            )
        if (index + 1) % steps:
            for variable, value in zip(variables, before):
                np.testing.assert_array_equal(
                    to_numpy(variable), value, err_msg=f"moved at micro-step {index}"
                )
            continue
        expected, states, skipped = _reference.soma_accumulated_steps(
            starts,
            gradients[: index + 1],
            [_reference.soma_init(start) for start in starts],
            0.01,
            accumulation_steps=steps,
            skip_nonfinite=bool(case.get("skip_nonfinite")),
            **reference_case,
        )
        window = f"after window {(index + 1) // steps}"
        for variable, value in zip(variables, expected):
            np.testing.assert_allclose(
                to_numpy(variable), value, rtol=1e-6, atol=1e-6, err_msg=window
            )
        assert_averages(optimizer, variables, states, 1e-5, window)
        if case.get("skip_nonfinite"):
            assert int(to_numpy(optimizer.skipped_steps)) == skipped
        before = [to_numpy(variable).copy() for variable in variables]
    assert int(to_numpy(optimizer.iterations)) == WINDOWS
    assert not np.allclose(to_numpy(variables[2]), starts[2]), "nothing moved"


@pytest.mark.parametrize("mode", accumulation_modes())
@pytest.mark.parametrize(
    "case",
    [
        {},
        {"weight_decay": 0.2},
        {"global_clipnorm": 0.5},
        {"use_ema": True, "ema_momentum": 0.5, "ema_overwrite_frequency": 2},
    ],
    ids=lambda c: str(c) or "plain",
)
@pytest.mark.parametrize("steps", [2, 4])
def test_accumulation_equals_keras_lion(steps, case, mode):
    """Soma(b) is Keras's Lion(b, b): with `gradient_accumulation_steps`
    too, where Soma keeps no accumulator and Lion keeps Keras's, after
    every micro-step (and with a schedule: Keras's learning rate reads
    the micro-step count)."""
    rng = np.random.default_rng(7)
    starts = [
        rng.standard_normal(shape).astype("float32") for shape in ACCUMULATION_SHAPES
    ]
    gradients = [
        [random_gradient(rng, shape) for shape in ACCUMULATION_SHAPES]
        for _ in range(WINDOWS * steps + 1)
    ]

    def trained(optimizer):
        variables = [keras.Variable(start) for start in starts]
        optimizer.build(variables)
        step = make_stepper(optimizer, variables, mode)
        history = []
        for micro_gradients in gradients:
            step(micro_gradients)
            history.append([to_numpy(variable).copy() for variable in variables])
        return history, int(to_numpy(optimizer.iterations))

    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 1, 0.7)
    arguments = dict(case, learning_rate=schedule, gradient_accumulation_steps=steps)
    if mode == "compiled_unfused":
        arguments["fused"] = False
    soma, soma_iterations = trained(keras_soma.Soma(momentum=0.9, **arguments))
    arguments.pop("fused", None)
    lion, lion_iterations = trained(
        keras.optimizers.Lion(beta_1=0.9, beta_2=0.9, **arguments)
    )
    assert soma_iterations == lion_iterations == WINDOWS
    for index, (soma_values, lion_values) in enumerate(zip(soma, lion)):
        for soma_value, lion_value in zip(soma_values, lion_values):
            np.testing.assert_allclose(
                soma_value,
                lion_value,
                rtol=1e-6,
                atol=1e-7,
                err_msg=f"after micro-step {index}",
            )
    assert not np.allclose(soma[-1][2], starts[2])


@pytest.mark.parametrize(
    "arguments,expected",
    [
        ({}, 4.0),
        ({"momentum_dtype": "bfloat16"}, 2.0),
        # Keras clips a window's mean gradient: Soma keeps its accumulator.
        ({"clipnorm": 1.0}, 8.0),
    ],
)
def test_accumulation_builds_no_accumulator(arguments, expected):
    variables = [keras.Variable(np.zeros(shape, "float32")) for shape in [(6, 4), (4,)]]
    optimizer = keras_soma.Soma(gradient_accumulation_steps=4, **arguments)
    optimizer.build(variables)
    assert state_bytes_per_parameter(optimizer, variables) == expected, (
        "Keras's Optimizer.build made gradient accumulators although Soma "
        "hid `gradient_accumulation_steps` from it"
        if expected < 8
        else "no accumulator with clipping"
    )
    accumulators = [v for v in optimizer.variables if "gradient_accumulator" in v.path]
    assert len(accumulators) == (2 if "clipnorm" in arguments else 0)


def test_accumulation_goes_through_keras_backend_apply_gradients(monkeypatch):
    """Soma folds accumulation by overriding Keras's private
    `_backend_apply_gradients` (and hiding `gradient_accumulation_steps`
    from it while it runs Keras's plain step)."""
    calls = []
    original = keras_soma.Soma._backend_apply_gradients

    def spy(self, grads, trainable_variables):
        calls.append(self.gradient_accumulation_steps)
        return original(self, grads, trainable_variables)

    monkeypatch.setattr(keras_soma.Soma, "_backend_apply_gradients", spy)
    variable = keras.Variable(np.zeros((3,), "float32"))
    optimizer = keras_soma.Soma(0.1, momentum=0.5, gradient_accumulation_steps=2)
    optimizer.build([variable])
    gradient = np.array([1.0, -1.0, 0.0], "float32")
    optimizer.apply([gradient], [variable])
    assert calls == [2], (
        "Keras's Optimizer.apply no longer calls `_backend_apply_gradients`: "
        "Soma's folded gradient accumulation (keras_soma/soma.py) must move "
        "to the hook that replaced it"
    )
    np.testing.assert_array_equal(to_numpy(variable), np.zeros(3))
    np.testing.assert_allclose(
        to_numpy(optimizer.get_slots(variable)["momentum"]),
        [0.25, -0.25, 0.0],
        err_msg="Keras's `_backend_apply_gradients` took its accumulator branch "
        "although Soma set `gradient_accumulation_steps` to None around it",
    )
    optimizer.apply([gradient], [variable])
    np.testing.assert_allclose(to_numpy(variable), [-0.1, 0.1, 0.0])
    assert optimizer.gradient_accumulation_steps == 2


def test_accumulation_keeps_keras_overwrite_with_gradient_variables():
    """Variables Keras overwrites with their gradient (float8 scales) keep
    Keras's accumulator and rule (the largest gradient of the window)."""

    def trained(optimizer):
        weights = keras.Variable(np.zeros((3,), "float32"))
        scale = keras.Variable(np.ones((2,), "float32"))
        scale.overwrite_with_gradient = True
        optimizer.build([weights, scale])
        values = []
        for gradient in ([3.0, 1.0], [2.0, 5.0], [4.0, 0.5], [1.0, 1.0]):
            optimizer.apply(
                [
                    keras.ops.ones((3,)),
                    keras.ops.convert_to_tensor(gradient, "float32"),
                ],
                [weights, scale],
            )
            values.append(to_numpy(scale).copy())
        return values, optimizer

    soma_values, soma = trained(keras_soma.Soma(gradient_accumulation_steps=2))
    lion_values, _ = trained(
        keras.optimizers.Lion(beta_1=0.95, beta_2=0.95, gradient_accumulation_steps=2)
    )
    for index, (actual, expected) in enumerate(zip(soma_values, lion_values)):
        np.testing.assert_array_equal(
            actual,
            expected,
            err_msg=f"micro-step {index}: Keras's handling of "
            "`overwrite_with_gradient` variables with accumulation "
            "(`_overwrite_variables_directly_with_gradients`, "
            "`_accumulated_gradients`) changed",
        )
    np.testing.assert_array_equal(soma_values[1], [3.0, 5.0])


def test_accumulation_config_round_trip():
    optimizer = keras_soma.Soma(gradient_accumulation_steps=4, momentum=0.9)
    config = optimizer.get_config()
    assert config["gradient_accumulation_steps"] == 4
    restored = keras_soma.Soma.from_config(config)
    assert restored.get_config() == config
    variable = keras.Variable(np.zeros((5,), "float32"))
    restored.build([variable])
    assert state_bytes_per_parameter(restored, [variable]) == 4.0


def test_accumulation_refuses_lazy_rows():
    with pytest.raises(ValueError) as raised:
        keras_soma.Soma(lazy_sparse_updates=True, gradient_accumulation_steps=2)
    message = str(raised.value)
    assert "`lazy_sparse_updates` must be False" in message
    assert "gradient_accumulation_steps=2" in message


def test_clipping_set_after_construction_is_refused():
    variable = keras.Variable(np.zeros((3,), "float32"))
    optimizer = keras_soma.Soma(gradient_accumulation_steps=2)
    optimizer.build([variable])
    optimizer.clipnorm = 1.0
    with pytest.raises(ValueError, match="clipnorm=1.0"):
        optimizer.apply([np.ones(3, "float32")], [variable])


@pytest.mark.parametrize("jit_compile", [True, False])
def test_accumulation_in_fit_equals_keras_lion(jit_compile):
    """`fit` (tf.function with the fused kernel, or XLA; jax.jit; torch)
    with accumulation, EMA and a schedule: Soma's weights and averages
    are Lion(b, b)'s."""
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((96, 8)).astype("float32")
    targets = rng.standard_normal((96, 1)).astype("float32")

    def fitted(optimizer):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="tanh"),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
        # 12 batches: 4 windows of 3.
        model.fit(inputs, targets, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return model

    arguments = dict(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, 2, 0.8),
        gradient_accumulation_steps=3,
        use_ema=True,
        ema_momentum=0.6,
    )
    soma = fitted(keras_soma.Soma(momentum=0.9, **arguments))
    lion = fitted(keras.optimizers.Lion(beta_1=0.9, beta_2=0.9, **arguments))
    assert int(to_numpy(soma.optimizer.iterations)) == 4
    for soma_weight, lion_weight in zip(soma.weights, lion.weights):
        np.testing.assert_allclose(
            to_numpy(soma_weight), to_numpy(lion_weight), rtol=1e-6, atol=1e-7
        )
    soma_kernel = soma.layers[0].kernel
    lion_kernel = lion.layers[0].kernel
    np.testing.assert_allclose(
        to_numpy(soma.optimizer.get_slots(soma_kernel)["momentum"]),
        to_numpy(
            lion.optimizer._momentums[lion.optimizer._get_variable_index(lion_kernel)]
        ),
        rtol=1e-5,
        atol=1e-7,
    )
    assert state_bytes_per_parameter(soma.optimizer, soma.trainable_variables) == 8.0


# ---------------------------------------------------------------------------
# momentum_dtype="int8": blockwise int8 average
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,block_size,blocks",
    [
        ((), 256, 1),
        ((7,), 256, 1),
        ((5, 3), 4, 4),
        ((5, 3), np.int64(4), 4),
        ((2, 3, 2, 4), 5, 10),
        ((8,), 8, 1),
    ],
)
def test_int8_state_is_codes_and_one_scale_per_block(shape, block_size, blocks):
    variable = keras.Variable(np.zeros(shape, "float32"))
    optimizer = keras_soma.Soma(momentum_dtype="int8", block_size=block_size)
    optimizer.build([variable])
    slots = optimizer.get_slots(variable)
    assert sorted(slots) == ["momentum", "momentum_scale"]
    assert keras.backend.standardize_dtype(slots["momentum"].dtype) == "int8"
    assert tuple(slots["momentum"].shape) == shape
    assert keras.backend.standardize_dtype(slots["momentum_scale"].dtype) == "float32"
    assert tuple(slots["momentum_scale"].shape) == (blocks,)
    # Never 0, so a fresh block dequantizes to zeros, not NaN.
    np.testing.assert_array_equal(to_numpy(slots["momentum_scale"]), np.ones(blocks))


@pytest.mark.parametrize("mode", accumulation_modes())
def test_int8_folded_accumulation_matches_reference_at_every_micro_step(mode):
    """The int8 average is dequantized, folded into and requantized at
    every micro-step (`_reference.soma_micro_step`); 35 elements in blocks
    of 16 (a partial last block)."""
    rng = np.random.default_rng(11)
    start = rng.standard_normal((5, 7)).astype("float32")
    variable = keras.Variable(start)
    optimizer = accumulating_optimizer(
        3, mode, learning_rate=0.01, momentum_dtype="int8", block_size=16
    )
    optimizer.build([variable])
    step = make_stepper(optimizer, [variable], mode)
    state = _reference.soma_init(start, momentum_dtype="int8", block_size=16)
    expected = start
    for index in range(6):
        gradient = random_gradient(rng, (5, 7))
        step([gradient])
        moved, state = _reference.soma_micro_step(
            expected,
            gradient,
            state,
            0.01,
            accumulation_steps=3,
            starts=index % 3 == 0,
            momentum_dtype="int8",
            block_size=16,
        )
        if index % 3 == 2:
            expected = moved
        slots = optimizer.get_slots(variable)
        codes = to_numpy(slots["momentum"]).astype(np.int32)
        assert np.abs(codes - state["momentum"]).max() <= 1, index
        np.testing.assert_allclose(
            to_numpy(slots["momentum_scale"]), state["momentum_scale"], rtol=1e-6
        )
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(expected, start)


def test_float_momentum_has_no_scale_slot():
    variable = keras.Variable(np.zeros((3,), "float32"))
    optimizer = keras_soma.Soma()
    optimizer.build([variable])
    assert sorted(optimizer.get_slots(variable)) == ["momentum"]


def quantize_round_trip(values, block_size):
    from keras_soma import _quantize

    codes, scales = _quantize.quantize_blockwise(
        keras.ops.convert_to_tensor(np.asarray(values, "float32")), block_size
    )
    restored = _quantize.dequantize_blockwise(codes, scales, block_size)
    return to_numpy(codes), to_numpy(scales), to_numpy(restored)


def test_quantize_matches_reference_and_bounds_the_error():
    rng = np.random.default_rng(5)
    values = (rng.standard_normal((9, 7)) * np.logspace(-6, 2, 7)).astype("float32")
    codes, scales, restored = quantize_round_trip(values, 8)
    expected_codes, expected_scales = _reference.quantize_blockwise(values, 8)
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_array_equal(scales, expected_scales)
    np.testing.assert_array_equal(
        restored, _reference.dequantize_blockwise(codes, scales, 8)
    )
    # The sqrt code: within half a code of sqrt(|x| / scale), so within
    # (2 / 254 + 1 / 254**2) of the scale in value; each block's largest
    # magnitude is exact, and small values keep their sign down to
    # scale / 16129 rather than the linear code's scale / 127.
    per_element = np.repeat(scales, 8)[: values.size].reshape(values.shape)
    bound = per_element * (2 / 254 + 1 / 254**2) * (1 + 1e-6)
    assert (np.abs(restored - values) <= bound).all()
    assert (np.abs(codes) <= 127).all()
    small = np.abs(values) >= per_element / 16129
    assert (np.sign(restored)[small] == np.sign(values)[small]).all()
    for block in range(len(scales)):
        chunk = values.reshape(-1)[block * 8 : (block + 1) * 8]
        assert scales[block] == np.abs(chunk).max()


def test_quantize_zero_block_nan_and_overflow():
    values = np.array([0, 0, 0, 0, np.nan, 1, np.inf, -2], "float32")
    codes, scales, restored = quantize_round_trip(values, 4)
    # An all-zero block: scale 1, codes 0, values 0 (not NaN).
    np.testing.assert_array_equal(codes[:4], 0)
    assert scales[0] == 1.0
    np.testing.assert_array_equal(restored[:4], 0.0)
    # NaN is stored as 0; Inf saturates, so the scale stays finite.
    assert codes[4] == 0
    assert np.isfinite(scales).all() and (scales > 0).all()
    assert scales[1] == np.finfo(np.float32).max
    assert codes[6] == 127


def test_int8_moves_by_the_sign_of_the_float_average():
    """An element whose average rounds to the code 0 still moves this
    step: the sign is taken before requantizing."""
    optimizer = keras_soma.Soma(0.1, momentum=0.5, momentum_dtype="int8", block_size=2)
    # 5e-7 / 0.5 = 1e-6 of the block's scale: 127 * sqrt(1e-6) < 0.5.
    variable = stepped(optimizer, [0.0, 0.0], [[1.0, 1e-6]])
    np.testing.assert_allclose(to_numpy(variable), [-0.1, -0.1])
    np.testing.assert_array_equal(
        to_numpy(optimizer.get_slots(variable)["momentum"]), [127, 0]
    )


@pytest.mark.parametrize("block_size", [0, -1, 2.5, "256", True, None])
def test_block_size_must_be_a_positive_integer(block_size):
    with pytest.raises(ValueError) as raised:
        keras_soma.Soma(momentum_dtype="int8", block_size=block_size)
    message = str(raised.value)
    assert "`block_size` must be an integer >= 1" in message
    assert f"block_size={block_size!r}" in message


def test_unknown_momentum_dtype_names_the_valid_values():
    with pytest.raises(ValueError) as raised:
        keras_soma.Soma(momentum_dtype="uint8")
    message = str(raised.value)
    for valid in ("'float32'", "'bfloat16'", "'float16'", "'int8'"):
        assert valid in message
    assert "momentum_dtype='uint8'" in message


@requires_torch
@pytest.mark.parametrize("accumulation", [None, 2], ids=["plain", "accumulated"])
def test_int8_torch_step_equals_op_by_op_with_non_finite_gradients(accumulation):
    """The multi-tensor int8 step on PyTorch (`_torch_step.soma_int8`)
    gives the op-by-op update's variables, codes and scales bit for bit,
    with NaN, Inf and float32-extreme gradient elements, blocks of 4 over
    35 elements (a partial last block), weight decay and folded gradient
    accumulation: a NaN makes its parameter NaN at a step that moves it
    (a window's last micro-step) and its average 0."""
    rng = np.random.default_rng(0)
    initial = rng.standard_normal((7, 5)).astype("float32")
    gradients = [rng.standard_normal((7, 5)).astype("float32") for _ in range(3)]
    gradients[1][2, 3] = np.nan
    gradients[1][0, 0] = np.inf
    gradients[2][4, 4] = -3e38
    gradients[2][1, 1] = np.nan
    results = {}
    for fused in (None, False):
        variable = keras.Variable(initial)
        optimizer = keras_soma.Soma(
            learning_rate=0.01,
            momentum_dtype="int8",
            block_size=4,
            weight_decay=0.1,
            fused=fused,
            gradient_accumulation_steps=accumulation,
        )
        for gradient in gradients:
            optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])
        results[fused] = [to_numpy(v) for v in [variable, *optimizer.variables]]
    for multi_tensor, op_by_op in zip(results[None], results[False]):
        np.testing.assert_array_equal(multi_tensor, op_by_op)
    # Plain: both NaN elements move their parameters; accumulated: only
    # the one at the first window's last micro-step.
    assert np.isnan(results[None][0]).sum() == (2 if accumulation is None else 1)
