"""Host memory that compiling Keras's JAX train step takes, per optimizer.

On JAX the first `fit` step compiles the whole train step, and the
process's peak during that step (`peak_memory.py`'s first-step figures)
includes what XLA's compiler uses and what the compiled program keeps.
This script builds the transformer of `peak_memory.py` and each
optimizer's state, lowers Keras's train step (`jax.jit(model.train_step)`
with the state donated, as Keras does) and compiles it, one fresh process
per optimizer, and prints how far the process's peak and resident size
rose during the compile alone, next to XLA's temporaries for the step
(`memory_analysis()`): a program with more ops costs more to compile
whatever its buffers.

    KERAS_BACKEND=jax python benchmarks/jax_compile_memory.py
    KERAS_BACKEND=jax python benchmarks/jax_compile_memory.py --short
    KERAS_BACKEND=jax python benchmarks/jax_compile_memory.py \\
        --output docs/results/jax_compile_memory.md

About two minutes on two CPU cores for the defaults (it compiles, it does
not train). JAX backend, Linux only (it reads /proc/self).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
import jax_step_buffers  # noqa: E402
import peak_memory  # noqa: E402

DEFAULT_OPTIMIZERS = ["sgd", "adam", "lion", "soma", "gradsign", "sm3-m0", "sm3"]
MIB = 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peak_memory.add_state_arguments(parser, DEFAULT_OPTIMIZERS)
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        parser.error(
            f"run with KERAS_BACKEND=jax; received backend {keras.backend.backend()!r}"
        )
    return args


def compile_memory(name: str, short: bool) -> dict:
    """Compiles the transformer's train step with `name` and returns what
    the compile added to the process's peak and resident size (bytes), and
    XLA's temporaries for the step."""
    size = peak_memory.SHORT if short else peak_memory.DEFAULTS
    case = peak_memory.build_case("transformer", size, 0)
    model, lowered = jax_step_buffers.lowered_step(name, case)
    # JAX initializes the weights and the state asynchronously: wait, so
    # that none of it lands in the compile's figures.
    peak_memory.wait_for(model.variables + model.optimizer.variables)
    gc.collect()
    resident_before = peak_memory._status_kib("VmRSS") * 1024
    peak_memory._reset_peak()
    compiled = lowered.compile()
    peak = peak_memory._status_kib("VmHWM") * 1024
    gc.collect()
    return {
        "parameters": model.count_params(),
        "state": int(peak_memory.optimizer_state_bytes(model.optimizer)),
        "compile_peak": peak - resident_before,
        "kept": peak_memory._status_kib("VmRSS") * 1024 - resident_before,
        "temporary": compiled.memory_analysis().temp_size_in_bytes,
    }


def main(argv=None):
    """Prints (and with `--output` writes) the table; returns each
    optimizer's measurements in bytes (`compile_memory`'s dict)."""
    args = parse_args(argv)
    results = peak_memory.run_state_workers(
        args, os.path.abspath(__file__), compile_memory
    )
    if results is None:
        return None
    report = _report.Report()
    command = _report.command_line("benchmarks/jax_compile_memory.py", argv)
    report.emit(
        _report.provenance(
            command,
            "peak_memory.py's transformer and each optimizer's state built, "
            "Keras's train step lowered, then compiled alone (the peak reset "
            "just before), a fresh process each.\n",
        )
    )
    baseline = results.get("sgd")
    rows = []
    for name, measured in results.items():
        beyond = (
            "-"
            if baseline is None
            else f"{(measured['compile_peak'] - baseline['compile_peak']) / MIB:+.0f}"
        )
        rows.append(
            [
                peak_memory.OPTIMIZERS[name][0],
                f"{measured['parameters']:,}",
                f"{measured['state'] / MIB:.1f}",
                f"{measured['temporary'] / MIB:.0f}",
                f"{measured['compile_peak'] / MIB:.0f}",
                beyond,
                f"{measured['kept'] / MIB:.0f}",
            ]
        )
    report.emit(
        _report.markdown_table(
            [
                "optimizer",
                "params",
                "state (MiB)",
                "step's temporaries (MiB)",
                "compile: peak rose by (MiB)",
                "- Keras SGD's (MiB)",
                "compile: resident size rose by (MiB)",
            ],
            rows,
        )
    )
    report.write(args.output)
    return results


if __name__ == "__main__":
    main()
