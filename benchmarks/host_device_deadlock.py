"""Keras `fit` over CPU host devices: the deadlock, and waiting for each step.

    KERAS_BACKEND=jax python benchmarks/host_device_deadlock.py [--devices 4]
        [--steps 1000] [--timeout 150] [--rendezvous-timeout 40]
        [--cases keras-adam ...]
        [--output docs/results/host_device_deadlock.md]

Each case trains the fashion-MNIST MLP's shape (Flatten-128-64-10 on 28 x 28
random inputs) with `fit(verbose=0)` for STEPS steps of batch 64 under
`keras.distribution.DataParallel` over DEVICES host devices, in a process
of its own (XLA reads the device count when JAX starts), and reports how
it ended:

* `keras-adam`: Keras's own Adam, as Keras runs it;
* `keras-adam-waiting`: the same with `keras_soma.distribute.wait_for_each_step`;
* `soma`: `keras_soma.Soma()` as Keras runs it;
* `vote`: `keras_soma.distribute.majority_vote` (which waits for each step
  on host devices).

XLA's CPU collectives keep their default 40 s rendezvous timeout unless
told otherwise (`--rendezvous-timeout`), so a deadlock ends the process with
XLA's "Termination timeout" message instead of hanging until TIMEOUT.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CASES = ("keras-adam", "keras-adam-waiting", "soma", "vote")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_SIZE = 64


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per case")
    parser.add_argument(
        "--rendezvous-timeout",
        type=int,
        default=40,
        help="seconds XLA's CPU collectives wait for a late device before "
        "they abort the process (XLA's default: 40); raise it on a loaded "
        "machine",
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--output", default=None, help="also write a Markdown file")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    for name, least in (("devices", 2), ("steps", 1), ("rendezvous_timeout", 1)):
        if getattr(arguments, name) < least:
            parser.error(
                f"--{name.replace('_', '-')} must be an integer >= {least}; "
                f"received {getattr(arguments, name)}"
            )
    if arguments.timeout <= 0:
        parser.error(f"--timeout must be > 0; received {arguments.timeout}")
    return arguments


def train(case, devices, steps):
    """Runs one case in this process; prints the seconds `fit` took."""
    import keras
    import numpy as np

    import keras_soma

    distribution = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices("cpu")[:devices]
    )
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(0)
    inputs = np.random.rand(BATCH_SIZE * steps, 28, 28).astype("float32")
    labels = np.random.randint(0, 10, BATCH_SIZE * steps)
    model = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    optimizer = keras.optimizers.Adam() if case.startswith("keras") else None
    model.compile(
        optimizer=optimizer or keras_soma.Soma(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    if case == "keras-adam-waiting":
        keras_soma.distribute.wait_for_each_step(model)
    if case == "vote":
        keras_soma.distribute.majority_vote(model)
    started = time.perf_counter()
    history = model.fit(inputs, labels, batch_size=BATCH_SIZE, epochs=1, verbose=0)
    seconds = time.perf_counter() - started
    loss = history.history["loss"][-1]
    waited = getattr(model.train_function, "waits_for_each_step", False)
    print(
        f"finished: {steps} steps in {seconds:.1f} s, loss {loss:.4f}, "
        f"waited for each step: {'yes' if waited else 'no'}",
        flush=True,
    )


def run_case(case, arguments):
    """`(outcome, seconds)` of one case run in a child process."""
    environment = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": ROOT,
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        "XLA_FLAGS": (
            f"--xla_force_host_platform_device_count={arguments.devices} "
            "--xla_cpu_collective_call_terminate_timeout_seconds="
            f"{arguments.rendezvous_timeout} "
            f"--xla_cpu_collective_timeout_seconds={arguments.rendezvous_timeout}"
        ),
    }
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        case,
        "--devices",
        str(arguments.devices),
        "--steps",
        str(arguments.steps),
    ]
    started = time.perf_counter()
    try:
        completed = subprocess.run(
            command,
            env=environment,
            capture_output=True,
            text=True,
            timeout=arguments.timeout,
        )
    except subprocess.TimeoutExpired:
        return f"no progress after {arguments.timeout:.0f} s (killed)", None
    seconds = time.perf_counter() - started
    for line in completed.stdout.splitlines():
        if line.startswith("finished:"):
            return line, seconds
    if "Termination timeout" in completed.stderr:
        return (
            "deadlock: XLA aborted the process (rendezvous termination "
            f"timeout), exit status {completed.returncode}",
            seconds,
        )
    tail = completed.stderr.strip().splitlines()[-1:] or ["(no output)"]
    return f"failed with exit status {completed.returncode}: {tail[0]}", seconds


def main(argv=None):
    arguments = parse_arguments(argv)
    if arguments.child:
        train(arguments.child, arguments.devices, arguments.steps)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import _report
    import keras

    if keras.backend.backend() != "jax":
        sys.exit("run with KERAS_BACKEND=jax")
    report = _report.Report()
    report.emit(
        _report.provenance(
            _report.command_line("benchmarks/host_device_deadlock.py"),
            f"`fit(verbose=0)` for {arguments.steps} steps of batch "
            f"{BATCH_SIZE} under DataParallel over {arguments.devices} host "
            "devices, each case in a fresh process.",
        )
    )
    report.emit()
    rows = []
    for case in arguments.cases:
        outcome, seconds = run_case(case, arguments)
        print(f"{case}: {outcome}", file=sys.stderr, flush=True)
        rows.append([case, outcome, _report.format_optional(seconds, ".0f")])
    report.emit(_report.markdown_table(["case", "outcome", "process (s)"], rows))
    report.write(arguments.output)


if __name__ == "__main__":
    main()
