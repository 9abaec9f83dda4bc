"""The registry of every exported keras_soma optimizer.

Adding an optimizer to the library means adding one `OptimizerSpec` here;
the contract suite (`test_contract.py`) and the reference tests
(`test_reference.py`) are parameterized over `REGISTRY`, and
`test_registry_lists_every_export` fails if an export is missing.

A state format that changes what an optimizer stores (Soma's and SM3's
blockwise int8 momentum) is a row of its own in `STATE_FORMATS`, with the
constructor arguments that select it (`arguments`); the contract, reference
and property suites run over `CONTRACT_ROWS`, both tables together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras_soma
from keras_soma import _reference


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """What the shared tests need to know about one optimizer."""

    cls: type
    # Pure-numpy reference: init(variable, **hyper) and
    # step(variable, gradient, state, learning_rate, weight_decay, **hyper).
    reference_init: Callable
    reference_step: Callable
    # Constructor arguments (besides learning_rate) to check against the
    # reference; the first is the defaults.
    reference_cases: list[dict[str, Any]]
    # A learning rate at which fit() on the small test problem makes
    # progress within a few epochs.
    fit_learning_rate: float
    # Optimizer state bytes per parameter on the fashion-MNIST MLP
    # (scalars aside), by constructor arguments.
    bytes_per_parameter: list[tuple[dict[str, Any], float]]
    # (constructor arguments, name of the argument the ValueError names).
    bad_arguments: list[tuple[dict[str, Any], str]]
    # Non-default constructor arguments for config round trips.
    config_case: dict[str, Any]
    # Numeric arguments besides learning_rate and their valid ranges,
    # (low, high, low_inclusive, high_inclusive): property tests draw
    # values on both sides.
    argument_ranges: dict[str, tuple[float, float, bool, bool]] = dataclasses.field(
        default_factory=dict
    )
    # The numpy reference of the row path for a row-sliced gradient (a
    # tf.IndexedSlices, a BCOO or torch sparse COO tensor with one sparse
    # dimension), step(variable, indices, values, state, learning_rate,
    # weight_decay, **hyper), and the constructor arguments that select
    # that path; None where the optimizer has no row path.
    sparse_reference_step: Callable | None = None
    sparse_arguments: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Constructor arguments every optimizer of this row is made with
    # (`make`), and the row's name suffix: set for the rows of
    # `STATE_FORMATS` only.
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)
    suffix: str = ""
    # The compiled step's temporaries (JAX, XLA's memory analysis) may
    # take this many times the bytes of the largest float32 variable.
    temporary_allowance: float = 1.0

    @property
    def name(self) -> str:
        return self.cls.__name__ + self.suffix

    def make(self, **kwargs):
        """The optimizer with this row's `arguments`, then `kwargs`."""
        return self.cls(**{**self.arguments, **kwargs})

    def takes_row_path(self, arguments: dict[str, Any]) -> bool:
        """Whether the optimizer built with `arguments` applies a
        row-sliced gradient through its row path (else it applies the
        dense gradient the rows stand for)."""
        if self.sparse_reference_step is None:
            return False
        return all(
            arguments.get(name) == value
            for name, value in self.sparse_arguments.items()
        )


COMMON_BAD_ARGUMENTS = [
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": "fast"}, "learning_rate"),
    ({"skip_nonfinite": "yes"}, "skip_nonfinite"),
    ({"fused": 1}, "fused"),
    ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps"),
    ({"gradient_accumulation_steps": 2.5}, "gradient_accumulation_steps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"clipnorm": float("nan")}, "clipnorm"),
    ({"clipvalue": -1.0}, "clipvalue"),
    ({"global_clipnorm": "large"}, "global_clipnorm"),
]

REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> None:
    REGISTRY[spec.name] = spec


register(
    OptimizerSpec(
        cls=keras_soma.Soma,
        reference_init=_reference.soma_init,
        reference_step=_reference.soma_step,
        reference_cases=[
            {},
            {"momentum": 0.5},
            {"momentum": 0.0},
            {"momentum_dtype": "bfloat16"},
            {"momentum": 0.9, "momentum_dtype": "float16"},
        ],
        fit_learning_rate=1e-2,
        bytes_per_parameter=[({}, 4.0), ({"momentum_dtype": "bfloat16"}, 2.0)],
        bad_arguments=COMMON_BAD_ARGUMENTS
        + [
            ({"momentum": 1.0}, "momentum"),
            ({"momentum": -0.1}, "momentum"),
            ({"momentum": float("nan")}, "momentum"),
            ({"momentum": "high"}, "momentum"),
            ({"momentum_dtype": "int4"}, "momentum_dtype"),
            ({"block_size": 0}, "block_size"),
            ({"momentum_dtype": "float64x"}, "momentum_dtype"),
            ({"lazy_sparse_updates": "yes"}, "lazy_sparse_updates"),
            (
                {"lazy_sparse_updates": True, "gradient_accumulation_steps": 2},
                "lazy_sparse_updates",
            ),
        ],
        config_case={
            "learning_rate": 3e-3,
            "momentum": 0.8,
            "momentum_dtype": "bfloat16",
            "lazy_sparse_updates": True,
        },
        argument_ranges={"momentum": (0.0, 1.0, True, False)},
        sparse_reference_step=_reference.soma_sparse_step,
        sparse_arguments={"lazy_sparse_updates": True},
    )
)

register(
    OptimizerSpec(
        cls=keras_soma.GradSign,
        reference_init=_reference.gradsign_init,
        reference_step=_reference.gradsign_step,
        reference_cases=[{}],
        fit_learning_rate=1e-2,
        bytes_per_parameter=[({}, 1.0)],
        bad_arguments=COMMON_BAD_ARGUMENTS
        + [
            ({"lazy_sparse_updates": 1}, "lazy_sparse_updates"),
            (
                {"lazy_sparse_updates": True, "gradient_accumulation_steps": 2},
                "lazy_sparse_updates",
            ),
        ],
        config_case={
            "learning_rate": 3e-3,
            "skip_nonfinite": True,
            "lazy_sparse_updates": True,
        },
        sparse_reference_step=_reference.gradsign_sparse_step,
        sparse_arguments={"lazy_sparse_updates": True},
    )
)

# SM3 with momentum=0 on the MLP: float32 accumulators of 784 + 128 and
# 128 + 64 and 64 + 10 numbers for the kernels, 128, 64 and 10 for the
# biases, over 784*128 + 128 + 128*64 + 64 + 64*10 + 10 = 109,386 parameters.
SM3_ACCUMULATOR_BYTES_PER_PARAMETER = (
    4 * (784 + 128 + 128 + 128 + 64 + 64 + 64 + 10 + 10) / 109_386
)

register(
    OptimizerSpec(
        cls=keras_soma.SM3,
        reference_init=_reference.sm3_init,
        reference_step=_reference.sm3_step,
        reference_cases=[
            {},
            {"variant": "I"},
            {"momentum": 0.0},
            {"variant": "I", "momentum": 0.0, "beta_2": 0.9},
            {"beta_2": 0.99, "epsilon": 1e-8},
            {"momentum_dtype": "bfloat16"},
            {"momentum": 0.5, "momentum_dtype": "float32"},
        ],
        fit_learning_rate=0.1,
        bytes_per_parameter=[
            ({"momentum": 0.0}, SM3_ACCUMULATOR_BYTES_PER_PARAMETER),
            # momentum adds one float32 per parameter.
            ({}, 4.0 + SM3_ACCUMULATOR_BYTES_PER_PARAMETER),
            ({"momentum_dtype": "bfloat16"}, 2.0 + SM3_ACCUMULATOR_BYTES_PER_PARAMETER),
            # No momentum, so no int8 codes or scales either.
            (
                {"momentum": 0.0, "momentum_dtype": "int8"},
                SM3_ACCUMULATOR_BYTES_PER_PARAMETER,
            ),
        ],
        bad_arguments=COMMON_BAD_ARGUMENTS
        + [
            ({"variant": "III"}, "variant"),
            ({"variant": 2}, "variant"),
            ({"momentum": 1.0}, "momentum"),
            ({"momentum": -0.1}, "momentum"),
            ({"beta_2": 0.0}, "beta_2"),
            ({"beta_2": 1.5}, "beta_2"),
            ({"beta_2": float("nan")}, "beta_2"),
            ({"epsilon": -1e-8}, "epsilon"),
            ({"epsilon": float("inf")}, "epsilon"),
            ({"blocked": 1}, "blocked"),
            ({"momentum_dtype": "int4"}, "momentum_dtype"),
            ({"momentum_dtype": "float64"}, "momentum_dtype"),
            ({"block_size": 0}, "block_size"),
        ],
        config_case={
            "learning_rate": 0.05,
            "momentum": 0.0,
            "momentum_dtype": "bfloat16",
            "block_size": 64,
            "beta_2": 0.99,
            "epsilon": 1e-8,
            "variant": "I",
        },
        # SM3 always takes its row path.
        sparse_reference_step=_reference.sm3_sparse_step,
    )
)


# Soma with int8 momentum on the MLP: one byte per parameter plus a float32
# scale per block of 256, ceil(size / 256) per variable: 392 + 1 + 32 + 1
# + 3 + 1 = 430 blocks for the kernels and biases of 784*128, 128, 128*64,
# 64, 64*10 and 10 parameters.
SOMA_INT8_BYTES_PER_PARAMETER = 1.0 + 4 * 430 / 109_386

STATE_FORMATS: dict[str, OptimizerSpec] = {}

INT8 = {"momentum_dtype": "int8"}
_soma_int8 = OptimizerSpec(
    cls=keras_soma.Soma,
    suffix="-int8",
    arguments=INT8,
    reference_init=_reference.soma_init,
    reference_step=_reference.soma_step,
    # Small blocks, so that the test shapes have several blocks and a
    # partial last one.
    reference_cases=[
        dict(INT8),
        {**INT8, "block_size": 4},
        {**INT8, "block_size": 5, "momentum": 0.5},
        {**INT8, "block_size": 1, "momentum": 0.99},
    ],
    fit_learning_rate=1e-2,
    bytes_per_parameter=[
        (dict(INT8), SOMA_INT8_BYTES_PER_PARAMETER),
        ({**INT8, "block_size": 64}, 1.0 + 4 * (1568 + 2 + 128 + 1 + 10 + 1) / 109_386),
    ],
    bad_arguments=COMMON_BAD_ARGUMENTS
    + [
        ({"block_size": 0}, "block_size"),
        ({"block_size": -256}, "block_size"),
        ({"block_size": 2.5}, "block_size"),
        ({"block_size": "256"}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"momentum_dtype": "uint8"}, "momentum_dtype"),
        ({"momentum_dtype": "int4"}, "momentum_dtype"),
        (
            {"lazy_sparse_updates": True, "gradient_accumulation_steps": 2},
            "lazy_sparse_updates",
        ),
    ],
    config_case={
        "learning_rate": 3e-3,
        "momentum": 0.8,
        "momentum_dtype": "int8",
        "block_size": 64,
        "lazy_sparse_updates": True,
    },
    argument_ranges={"momentum": (0.0, 1.0, True, False)},
    sparse_reference_step=_reference.soma_sparse_step,
    sparse_arguments={"lazy_sparse_updates": True},
    # The block maximum folds each block onto itself three times before
    # XLA's reduction (`_quantize.block_absmax`), so what is materialized
    # for the new scales is an eighth of the average, not all of it: XLA's
    # analysis gives 0.47-0.49 times the largest variable at block sizes
    # 256-64 on the test's shapes (1.31 with one plain reduction), JAX
    # 0.10 on CPU; the default allowance of 1 holds.
)
STATE_FORMATS[_soma_int8.name] = _soma_int8

# SM3 with int8 momentum on the MLP: Soma-int8's codes and scales (the
# same blocks) plus SM3's float32 accumulators.
SM3_INT8_BYTES_PER_PARAMETER = (
    SOMA_INT8_BYTES_PER_PARAMETER + SM3_ACCUMULATOR_BYTES_PER_PARAMETER
)

_sm3_int8 = OptimizerSpec(
    cls=keras_soma.SM3,
    suffix="-int8",
    arguments=INT8,
    reference_init=_reference.sm3_init,
    reference_step=_reference.sm3_step,
    # Small blocks, so that the test shapes have several blocks and a
    # partial last one.
    reference_cases=[
        dict(INT8),
        {**INT8, "block_size": 4},
        {**INT8, "block_size": 5, "momentum": 0.5, "variant": "I"},
        {**INT8, "block_size": 1, "momentum": 0.99, "beta_2": 0.99},
    ],
    fit_learning_rate=0.1,
    bytes_per_parameter=[
        (dict(INT8), SM3_INT8_BYTES_PER_PARAMETER),
        (
            {**INT8, "block_size": 64},
            1.0
            + 4 * (1568 + 2 + 128 + 1 + 10 + 1) / 109_386
            + SM3_ACCUMULATOR_BYTES_PER_PARAMETER,
        ),
    ],
    bad_arguments=COMMON_BAD_ARGUMENTS
    + [
        ({"block_size": 0}, "block_size"),
        ({"block_size": 2.5}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"momentum_dtype": "uint8"}, "momentum_dtype"),
        ({"variant": "III"}, "variant"),
    ],
    config_case={
        "learning_rate": 0.05,
        "momentum": 0.8,
        "momentum_dtype": "int8",
        "block_size": 64,
        "variant": "I",
    },
    # The row path requantizes the blocks of the rows stepped.
    sparse_reference_step=_reference.sm3_sparse_step,
    # SM3's whole-tensor update (where the row-blocked one does not run:
    # on GPU and TPU) materializes a float32 temporary the size of the
    # momentum, and the block maximum an eighth of it
    # (`_quantize.block_absmax`): XLA's analysis gives 1.86-1.87 times the
    # largest variable at block sizes 256-64 on the test's shapes (2.58
    # with one plain reduction for the scales), JAX 0.10 on CPU. The
    # row-blocked update requantizes block by block and stays within one
    # variable (tests/test_sm3.py).
    temporary_allowance=2.0,
)
STATE_FORMATS[_sm3_int8.name] = _sm3_int8

# What the contract, reference and property suites run over.
CONTRACT_ROWS: dict[str, OptimizerSpec] = {**REGISTRY, **STATE_FORMATS}


def exported_optimizers() -> list[type]:
    """Every optimizer class in `keras_soma.__all__`."""
    import keras

    exported = [getattr(keras_soma, name) for name in keras_soma.__all__]
    return [
        item
        for item in exported
        if isinstance(item, type) and issubclass(item, keras.optimizers.Optimizer)
    ]
