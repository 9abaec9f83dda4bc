"""Accuracy of majority-vote Soma against single-device Soma, fashion-MNIST MLP.

    KERAS_BACKEND=jax python benchmarks/vote_convergence.py [--workers 4]
        [--epochs 3] [--seeds 0 1 2] [--batch-size 64]

Trains the soma paper's MLP (Flatten-128-64-10) on fashion-MNIST (from
TFDS_DATA_DIR) with `keras_soma.Soma()` at its defaults, once on one device
and once with `keras_soma.distribute.majority_vote` over WORKERS host
devices (XLA_FLAGS is set here, before JAX starts), with the same global
batch and the same initial weights and data order per seed, and prints a
Markdown table of the test accuracies and their differences.
"""

from __future__ import annotations

import argparse
import os
import sys

WORKERS = 4
EPOCHS = 3
SEEDS = (0, 1, 2)
BATCH_SIZE = 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    return parser.parse_args(argv)


def test_accuracy(workers, seed, epochs, batch_size):
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
        train, test = common.load_fashion_mnist(batch_size, seed)
        model = common.build_mlp()
        model.compile(
            optimizer=keras_soma.Soma(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        if distribution is not None:
            keras_soma.distribute.majority_vote(model)
        model.fit(train, epochs=epochs, verbose=0)
        return float(model.evaluate(test, verbose=0, return_dict=True)["accuracy"])
    finally:
        keras.distribution.set_distribution(None)


def main(argv=None):
    arguments = parse_arguments(argv)
    if arguments.batch_size % arguments.workers:
        sys.exit("--batch-size must be a multiple of --workers")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from vote_traffic import host_device_flags

    os.environ["XLA_FLAGS"] = host_device_flags(arguments.workers)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    if keras.backend.backend() != "jax":
        sys.exit("run with KERAS_BACKEND=jax")
    seeds = " ".join(str(seed) for seed in arguments.seeds)
    print(
        f"keras {keras.__version__}; fashion-MNIST MLP, Soma defaults, global "
        f"batch {arguments.batch_size}, {arguments.epochs} epochs; command: "
        f"KERAS_BACKEND=jax python benchmarks/vote_convergence.py --workers "
        f"{arguments.workers} --epochs {arguments.epochs} --seeds {seeds} "
        f"--batch-size {arguments.batch_size}\n"
    )
    print(
        f"| seed | Soma, 1 device | majority vote, {arguments.workers} workers "
        "| difference (points) |"
    )
    print("|---:|---:|---:|---:|")
    differences = []
    for seed in arguments.seeds:
        single = test_accuracy(1, seed, arguments.epochs, arguments.batch_size)
        vote = test_accuracy(
            arguments.workers, seed, arguments.epochs, arguments.batch_size
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
