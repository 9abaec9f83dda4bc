"""Accuracy of majority-vote Soma against single-device Soma, fashion-MNIST.

    KERAS_BACKEND=jax python benchmarks/vote_convergence.py [--workers 4]
        [--epochs 3] [--seeds 0 1 2] [--batch-size 64] [--model mlp|cnn]
        [--steps-per-epoch N]

Trains the soma paper's MLP (Flatten-128-64-10) or CNN on fashion-MNIST
(from TFDS_DATA_DIR) with `keras_soma.Soma()` at its defaults, once on one device
and once with `keras_soma.distribute.majority_vote` over WORKERS host
devices (XLA_FLAGS is set here, before JAX starts), with the same global
batch and the same initial weights and data order per seed, and prints a
Markdown table of the test accuracies and their differences.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

WORKERS = 4
EPOCHS = 3
SEEDS = (0, 1, 2)
BATCH_SIZE = 64
MODELS = {"mlp": "MLP", "cnn": "CNN"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="train on this many batches per epoch (a short run); default: all",
    )
    arguments = parser.parse_args(argv)
    for name in ("workers", "epochs", "batch_size"):
        if getattr(arguments, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be an integer >= 1; "
                f"received {getattr(arguments, name)}"
            )
    if arguments.workers < 2:
        parser.error(
            f"--workers must be at least 2 (a vote); received {arguments.workers}"
        )
    if arguments.batch_size % arguments.workers:
        parser.error(
            f"--batch-size must be a multiple of --workers ({arguments.workers}); "
            f"received {arguments.batch_size}"
        )
    if arguments.steps_per_epoch is not None and arguments.steps_per_epoch < 1:
        parser.error(
            "--steps-per-epoch must be an integer >= 1; "
            f"received {arguments.steps_per_epoch}"
        )
    return arguments


def command(arguments) -> str:
    """The command line that reproduces a run with `arguments`."""
    seeds = " ".join(str(seed) for seed in arguments.seeds)
    line = (
        "KERAS_BACKEND=jax python benchmarks/vote_convergence.py "
        f"--workers {arguments.workers} --epochs {arguments.epochs} "
        f"--seeds {seeds} --batch-size {arguments.batch_size} "
        f"--model {arguments.model}"
    )
    if arguments.steps_per_epoch is not None:
        line += f" --steps-per-epoch {arguments.steps_per_epoch}"
    return line


def test_accuracy(workers, seed, arguments):
    import keras

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import fashion_mnist_common as common

    import keras_soma

    distribution = (
        keras.distribution.DataParallel(
            devices=keras.distribution.list_devices("cpu")[:workers]
        )
        if workers > 1
        else None
    )
    keras.distribution.set_distribution(distribution)
    try:
        keras.utils.set_random_seed(seed)
        # Built after seeding: every configuration sees the same batches.
        train, test = common.load_fashion_mnist(
            arguments.batch_size, seed, arguments.steps_per_epoch
        )
        model = {"mlp": common.build_mlp, "cnn": common.build_cnn}[arguments.model]()
        model.compile(
            optimizer=keras_soma.Soma(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        if distribution is not None:
            keras_soma.distribute.majority_vote(model)
        model.fit(train, epochs=arguments.epochs, verbose=0)
        return float(model.evaluate(test, verbose=0, return_dict=True)["accuracy"])
    finally:
        keras.distribution.set_distribution(None)


def main(argv=None):
    arguments = parse_arguments(argv)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from vote_traffic import host_device_flags

    os.environ["XLA_FLAGS"] = host_device_flags(arguments.workers)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    if keras.backend.backend() != "jax":
        sys.exit("run with KERAS_BACKEND=jax")
    print(
        f"keras {keras.__version__}; fashion-MNIST {MODELS[arguments.model]}, "
        f"Soma defaults, global batch {arguments.batch_size}, "
        f"{arguments.epochs} epochs; command: {command(arguments)}\n"
    )
    print(
        f"| seed | Soma, 1 device | majority vote, {arguments.workers} workers "
        "| difference (points) |"
    )
    print("|---:|---:|---:|---:|")
    differences = []
    for seed in arguments.seeds:
        started = time.perf_counter()
        single = test_accuracy(1, seed, arguments)
        vote = test_accuracy(arguments.workers, seed, arguments)
        print(
            f"seed {seed}: both runs took {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        differences.append(100 * (vote - single))
        print(
            f"| {seed} | {100 * single:.2f} | {100 * vote:.2f} "
            f"| {differences[-1]:+.2f} |",
            flush=True,
        )
    mean = sum(differences) / len(differences)
    print(f"| mean | | | {mean:+.2f} |")


if __name__ == "__main__":
    main()
