"""What XLA allocates for Keras's compiled JAX train step, per optimizer.

The peak-memory benchmark (`peak_memory.py`) measures a process's peak
from outside. This script asks XLA instead: it compiles the train step
Keras's JAX trainer runs (`jax.jit(model.train_step)`, with the state
donated, as Keras does) for the recommender of `peak_memory.py` at two
table sizes, and prints XLA's buffer assignment of that step
(`compiled.memory_analysis()`): its temporaries, its arguments and what
its outputs share with the donated arguments, in bytes per parameter. A
per-parameter cost that the process's peak shows and the compiled step
does not is not in the step's buffers.

    KERAS_BACKEND=jax python benchmarks/jax_step_buffers.py
    KERAS_BACKEND=jax python benchmarks/jax_step_buffers.py --rows 250000 500000 \\
        --output docs/results/jax_step_buffers.md

About a minute on two CPU cores (it compiles, it does not train).
"""

from __future__ import annotations

import argparse
import os
import sys

import keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
import peak_memory  # noqa: E402

DEFAULT_OPTIMIZERS = ["sgd", "adam", "soma", "soma-lazy", "gradsign", "sm3-m0", "sm3"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[250_000, 500_000],
        help="embedding table sizes (two or more, for the slope)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=DEFAULT_OPTIMIZERS,
        choices=sorted(peak_memory.OPTIMIZERS),
    )
    parser.add_argument("--output", default=None, help="also write a Markdown file")
    args = parser.parse_args(argv)
    if len(args.rows) < 2 or min(args.rows) < 1 or len(set(args.rows)) < 2:
        parser.error(
            f"--rows must be at least 2 distinct integers >= 1; received {args.rows}"
        )
    if keras.backend.backend() != "jax":
        parser.error(
            f"run with KERAS_BACKEND=jax; received backend {keras.backend.backend()!r}"
        )
    return args


def lowered_step(optimizer_name: str, case: tuple):
    """Keras's JAX train step for `case` (`peak_memory.build_case`'s
    tuple) with `optimizer_name`'s state built, jitted with the state
    donated as Keras does and lowered for one batch (not compiled)."""
    import jax

    model, x, y, batch_size, loss = case
    model.compile(optimizer=peak_memory.OPTIMIZERS[optimizer_name][1](), loss=loss)
    model(peak_memory.take(x, 1))
    model.optimizer.build(model.trainable_variables)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    data = (peak_memory.take(x, batch_size), y[:batch_size])
    return model, jax.jit(model.train_step, donate_argnums=0).lower(state, data)


def step_buffers(optimizer_name: str, rows: int) -> dict:
    """XLA's buffer sizes (bytes) for the compiled train step of the
    recommender with `rows` rows, and its parameter count."""
    model, lowered = lowered_step(
        optimizer_name, peak_memory.build_case("recommender", peak_memory.SHORT, rows)
    )
    analysis = lowered.compile().memory_analysis()
    return {
        "parameters": model.count_params(),
        "temporary": analysis.temp_size_in_bytes,
        "arguments": analysis.argument_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
    }


def main(argv=None):
    args = parse_args(argv)
    report = _report.Report()
    command = _report.command_line("benchmarks/jax_step_buffers.py", argv)
    report.emit(
        _report.provenance(
            command,
            "XLA's memory_analysis() of jax.jit(model.train_step) with the "
            "state donated, recommender of peak_memory.py.\n",
        )
    )
    rows_out = []
    slopes = {}
    for name in args.optimizers:
        measured = []
        for rows in args.rows:
            buffers = step_buffers(name, rows)
            measured.append((buffers["parameters"], buffers))
            per = buffers["parameters"]
            rows_out.append(
                [
                    peak_memory.OPTIMIZERS[name][0],
                    f"{rows:,}",
                    f"{per:,}",
                    f"{buffers['temporary'] / per:.3f}",
                    f"{buffers['arguments'] / per:.3f}",
                    f"{buffers['aliased'] / per:.3f}",
                ]
            )
            print(f"  {name} at {rows:,} rows: compiled", flush=True)
        (small_params, small), (large_params, large) = measured[0], measured[-1]
        slopes[name] = (large["temporary"] - small["temporary"]) / (
            large_params - small_params
        )
    report.emit(
        _report.markdown_table(
            [
                "optimizer",
                "rows",
                "params",
                "temporaries (bytes / param)",
                "arguments (bytes / param)",
                "outputs in donated arguments (bytes / param)",
            ],
            rows_out,
        )
    )
    report.emit()
    report.emit(
        "Slope of the temporaries against the parameter count "
        f"({args.rows[0]:,} to {args.rows[-1]:,} rows), bytes / param:"
    )
    report.emit()
    for name, slope in slopes.items():
        report.emit(f"- {peak_memory.OPTIMIZERS[name][0]}: {slope:.3f}")
    report.write(args.output)
    return slopes


if __name__ == "__main__":
    main()
