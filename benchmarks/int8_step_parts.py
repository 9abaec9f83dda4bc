"""Where the time of Soma's int8 step goes, on TensorFlow.

`step_speed.py` times `Soma(momentum_dtype="int8")` against float32
Soma. This script takes the int8 step apart on the same problem (four
2048 x 2048 float32 variables by default), each part one XLA kernel over
every variable, timed in interleaved rounds in one process:

* the library's steps in `fit`'s default path (`optimizer.apply` in a
  `tf.function` with XLA off, which runs keras_soma's fused kernel):
  float32 Soma and int8 Soma;
* the int8 step composed from the library's functions (dequantize,
  `soma_update`, quantize), as the fused kernel runs it;
* the same without the block maximum: the codes are rounded against the
  previous step's scales (`_quantize.quantize_with_scales`). This is not
  a correct step (an element beyond its old scale saturates): it is the
  bound on what any format whose scale needs no reduction in the step
  that writes it could reach with the same code;
* the same with the linear code instead of the sqrt code;
* the block maximum alone: the average dequantized and updated, its
  largest magnitude per block written as the scales (what the composed
  step computes before it can round);
* the floor of int8 state: a copy reading the variable, the gradient,
  the codes and the scales and writing back the variable, the codes and
  the scales (`step_speed.tensorflow_floor`).

Every row is given in ms per step and as the median per-round ratio to
the library's float32 Soma step.

    python benchmarks/int8_step_parts.py
    python benchmarks/int8_step_parts.py \\
        --output docs/results/int8_step_parts_tensorflow.md
    python benchmarks/int8_step_parts.py --halvings 0 2 3 4

`--halvings` adds the composed step with the block maximum's rows folded
onto themselves that many times before XLA's reduction
(`_quantize.block_absmax`), the measurement behind the library's
setting.

About two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
import step_speed  # noqa: E402

import keras_soma  # noqa: E402
from keras_soma import _quantize  # noqa: E402
from keras_soma.soma import soma_average, soma_update  # noqa: E402

LEARNING_RATE = 2e-4
MOMENTUM = 0.95


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=2048, help="rows of each variable (default 2048)"
    )
    parser.add_argument(
        "--columns",
        type=int,
        default=2048,
        help="columns of each variable (default 2048)",
    )
    parser.add_argument(
        "--variables", type=int, default=4, help="how many variables (default 4)"
    )
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument(
        "--halvings",
        type=int,
        nargs="*",
        default=[],
        help="also time the composed step with the block maximum's rows "
        "folded this many times before XLA's reduction (the library folds "
        f"them {_quantize.ABSMAX_HALVINGS} times; 0 is one plain reduction)",
    )
    parser.add_argument("--output", default=None, help="also write a Markdown file")
    args = parser.parse_args(argv)
    for name in ("rows", "columns", "variables", "block_size", "steps", "repeats"):
        value = getattr(args, name)
        if value < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be an integer >= 1; received {value}"
            )
    for value in args.halvings:
        if value < 0 or 2**value > args.block_size:
            parser.error(
                "--halvings must be integers from 0 to log2(--block-size) = "
                f"{args.block_size.bit_length() - 1}; received {args.halvings}"
            )
    if (args.rows * args.columns) % args.block_size:
        parser.error(
            "--rows times --columns must be a multiple of --block-size (the "
            "block maximum alone is taken over whole blocks); received "
            f"{args.rows} x {args.columns} and {args.block_size}"
        )
    if keras.backend.backend() != "tensorflow":
        parser.error(
            "run with KERAS_BACKEND=tensorflow (the parts are XLA kernels of "
            f"TensorFlow's fused step); received backend {keras.backend.backend()!r}"
        )
    return args


def library_step(factory, variables, gradients):
    """The optimizer's own step, as `fit` runs it by default on CPU."""
    optimizer = factory()
    optimizer.build(variables)
    return step_speed.tensorflow_step(optimizer, variables, gradients, xla=False)


def parts(variables, gradients, block_size: int, halvings=()):
    """The int8 step's parts, each an XLA kernel over every variable, and
    the int8 state they work on: `(functions, codes, scales)`, the state
    starting at zero as an optimizer's does. For each count in
    `halvings`, the composed step with `block_absmax` folding its rows
    that many times (the setting is read when the step is traced, on its
    first call)."""
    import tensorflow as tf

    codes, scales = [], []
    for variable in variables:
        average = keras.ops.zeros(variable.shape)
        code_values, scale_values = _quantize.quantize_blockwise(average, block_size)
        codes.append(tf.Variable(code_values))
        scales.append(tf.Variable(scale_values))

    def step(quantize, code="sqrt"):
        @tf.function(jit_compile=True)
        def run():
            for variable, gradient, code_state, scale in zip(
                variables, gradients, codes, scales
            ):
                average = _quantize.dequantize_blockwise(
                    code_state, scale, block_size, code
                )
                new_value, average = soma_update(
                    variable, gradient, average, LEARNING_RATE, MOMENTUM
                )
                variable.assign(new_value)
                new_codes, new_scales = quantize(average, scale)
                code_state.assign(new_codes)
                if new_scales is not None:
                    scale.assign(new_scales)

        return run

    def with_maximum(average, scale):
        return _quantize.quantize_blockwise(average, block_size)

    def kept(code):
        def quantize(average, scale):
            return (
                _quantize.quantize_with_scales(average, scale, block_size, code),
                None,
            )

        return quantize

    def folded(count):
        composed = step(with_maximum)

        def run():
            library_setting = _quantize.ABSMAX_HALVINGS
            _quantize.ABSMAX_HALVINGS = count
            try:
                return composed()
            finally:
                _quantize.ABSMAX_HALVINGS = library_setting

        return run

    @tf.function(jit_compile=True)
    def maximum_alone():
        for gradient, code, scale in zip(gradients, codes, scales):
            average = soma_average(
                gradient,
                _quantize.dequantize_blockwise(code, scale, block_size),
                MOMENTUM,
            )
            blocked = keras.ops.reshape(average, (-1, block_size))
            scale.assign(_quantize.block_absmax(blocked))

    state = codes + scales
    functions = {
        "int8 step, composed (dequantize, update, quantize)": step(with_maximum),
        "the same, scales kept (no block maximum)": step(kept("sqrt")),
        "the same, scales kept, linear code": step(kept("linear"), "linear"),
        "block maximum alone": maximum_alone,
        "floor of int8 state (a copy of its bytes)": step_speed.tensorflow_floor(
            state, variables, gradients
        ),
    }
    for count in halvings:
        functions[f"the composed step, rows folded {count} times"] = folded(count)
    return functions, codes, scales


def measure(args):
    """Per-round milliseconds of every row, float32 Soma's first."""
    shapes = [(args.rows, args.columns)] * args.variables
    variables, gradients = step_speed.make_problem(shapes, "float32")
    functions = {
        "Soma float32, the library's step": library_step(
            lambda: keras_soma.Soma(learning_rate=LEARNING_RATE), variables, gradients
        ),
        "Soma int8, the library's step": library_step(
            lambda: keras_soma.Soma(
                learning_rate=LEARNING_RATE,
                momentum_dtype="int8",
                block_size=args.block_size,
            ),
            variables,
            gradients,
        ),
    }
    functions.update(parts(variables, gradients, args.block_size, args.halvings)[0])
    return step_speed.time_interleaved(functions, args.steps, args.repeats)


def main(argv=None):
    args = parse_args(argv)
    report = _report.Report()
    command = _report.command_line("benchmarks/int8_step_parts.py", argv)
    parameters = args.rows * args.columns * args.variables
    report.emit(
        _report.provenance(
            command,
            f"{args.variables} float32 variables of {args.rows} x {args.columns} "
            f"({parameters:,} parameters), block_size {args.block_size}, "
            f"{args.repeats} interleaved rounds of {args.steps} steps; medians.\n",
        )
    )
    blocks = measure(args)
    baseline = next(iter(blocks.values()))
    rows, ratios = [], {}
    for name, times in blocks.items():
        ratios[name] = _report.median_ratio(times, baseline)
        rows.append([name, f"{statistics.median(times):.2f}", f"{ratios[name]:.2f}"])
    report.emit(_report.markdown_table(["part", "ms / step", "x float32 Soma"], rows))
    report.write(args.output)
    return ratios


if __name__ == "__main__":
    main()
