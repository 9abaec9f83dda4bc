"""What TensorFlow's BFC allocator counts for an optimizer's state.

`peak_memory.py --tf-allocator-stats` reads TensorFlow's tensors through
its BFC allocator (`TF_CPU_ALLOCATOR_USE_BFC=true`), whose `current`
bytes count each allocation as the whole free chunk that served it: BFC
splits a chunk only where it is at least twice the request or more than
128 MB larger, so up to 128 MB beyond a large tensor's size is counted as
in use and stays with it. This script builds the transformer of
`peak_memory.py` and then each optimizer's state alone
(`optimizer.build`, before any step), one fresh process per optimizer,
and prints the state's own bytes against what BFC counts for it and what
the process's resident size grew by.

    python benchmarks/tf_allocator_slack.py
    python benchmarks/tf_allocator_slack.py --short
    python benchmarks/tf_allocator_slack.py --output docs/results/tf_allocator_slack.md

About a minute on two CPU cores (it builds, it does not train). TensorFlow
backend only.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
import peak_memory  # noqa: E402
import step_speed  # noqa: E402

DEFAULT_OPTIMIZERS = ["adam", "lion", "soma", "soma-bf16", "gradsign", "sm3-m0", "sm3"]
MIB = 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peak_memory.add_state_arguments(parser, DEFAULT_OPTIMIZERS)
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        parser.error(
            "TensorFlow's allocator only: run with KERAS_BACKEND=tensorflow "
            f"(this process has {keras.backend.backend()!r})"
        )
    return args


def state_build(name: str, short: bool) -> dict:
    """Builds the transformer and then `name`'s state, and returns the
    state's bytes, what BFC counts for it and the resident size's growth
    (run in a process whose BFC allocator is on)."""
    size = peak_memory.SHORT if short else peak_memory.DEFAULTS
    model, x, _, _, _ = peak_memory.build_case("transformer", size, 0, 0, None)
    model(peak_memory.take(x, 1))
    optimizer = peak_memory.OPTIMIZERS[name][1]()
    gc.collect()
    counted_before = peak_memory._tf_tensor_stats()[0]
    resident_before = peak_memory._status_kib("VmRSS") * 1024
    optimizer.build(model.trainable_variables)
    peak_memory.wait_for(optimizer.variables)
    gc.collect()
    return {
        "parameters": model.count_params(),
        "state": int(peak_memory.optimizer_state_bytes(optimizer)),
        "largest": max(map(step_speed.nbytes, optimizer.variables), default=0),
        "counted": peak_memory._tf_tensor_stats()[0] - counted_before,
        "resident": peak_memory._status_kib("VmRSS") * 1024 - resident_before,
    }


def main(argv=None):
    """Prints (and with `--output` writes) the table; returns each
    optimizer's measurements in bytes (`state_build`'s dict)."""
    args = parse_args(argv)
    results = peak_memory.run_state_workers(
        args,
        os.path.abspath(__file__),
        state_build,
        dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true"),
    )
    if results is None:
        return None
    report = _report.Report()
    command = _report.command_line("benchmarks/tf_allocator_slack.py", argv)
    report.emit(
        _report.provenance(
            command,
            "peak_memory.py's transformer built, then each optimizer's "
            "state alone (`optimizer.build`), a fresh process each with "
            "TF_CPU_ALLOCATOR_USE_BFC=true.\n",
        )
    )
    rows = []
    for name, measured in results.items():
        rows.append(
            [
                peak_memory.OPTIMIZERS[name][0],
                f"{measured['parameters']:,}",
                f"{measured['state'] / MIB:.1f}",
                f"{measured['largest'] / MIB:.1f}",
                f"{measured['counted'] / MIB:.1f}",
                f"{(measured['counted'] - measured['state']) / MIB:+.1f}",
                f"{measured['resident'] / MIB:.1f}",
            ]
        )
    report.emit(
        _report.markdown_table(
            [
                "optimizer",
                "params",
                "state (MiB)",
                "largest state tensor (MiB)",
                "BFC's count of it (MiB)",
                "counted beyond the state (MiB)",
                "resident size grew (MiB)",
            ],
            rows,
        )
    )
    report.write(args.output)
    return results


if __name__ == "__main__":
    main()
