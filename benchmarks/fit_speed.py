"""fit() seconds per epoch on the fashion-MNIST MLP: keras_soma against Keras.

What it measures: the wall time of training epochs of the soma paper's MLP
(batch 64, 938 steps per epoch) with `model.fit` at its defaults (on
TensorFlow: a tf.function train step, XLA off on CPU), for each optimizer.
Optimizers are interleaved epoch by epoch so that a noisy, shared machine
affects them alike; the median epoch is reported. The data is cached in
memory before timing starts.

Run time: about 1-2 minutes on a 2-core CPU.

    python benchmarks/fit_speed.py --epochs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
)

import fashion_mnist_common as common  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _report  # noqa: E402

OPTIMIZERS = ["soma", "gradsign", "sm3", "lion", "adam"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=3, help="timed epochs per optimizer"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=[n for n in OPTIMIZERS if n in common.OPTIMIZERS],
    )
    parser.add_argument(
        "--output", default=None, help="also write the table to this Markdown file"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    train, _ = common.load_fashion_mnist(args.batch_size, seed=0)
    models = {}
    for name in args.optimizers:
        keras.utils.set_random_seed(0)
        model = common.build_mlp()
        model.compile(
            optimizer=common.make_optimizer(name),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(train.take(10), epochs=1, verbose=0)  # trace and warm up
        models[name] = model
    seconds = {name: [] for name in models}
    for epoch in range(args.epochs):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(train, epochs=1, verbose=0)
            seconds[name].append(time.perf_counter() - start)
            print(f"epoch {epoch + 1}: {name:8s} {seconds[name][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    rows = []
    for name, value in medians.items():
        lion = f"{value / medians['lion']:.2f}" if "lion" in medians else "-"
        adam = f"{value / medians['adam']:.2f}" if "adam" in medians else "-"
        rows.append([common.DISPLAY_NAMES[name], f"{value:.2f}", lion, adam])
    table = _report.markdown_table(
        ["optimizer", "s / epoch", "x Keras Lion", "x Keras Adam"], rows
    )
    command = _report.command_line("benchmarks/fit_speed.py", argv)
    method = f"median of {args.epochs} epochs, batch {args.batch_size}."
    print()
    report = _report.Report()
    report.emit(table + "\n\n" + _report.provenance(command, method))
    report.write(args.output)


if __name__ == "__main__":
    main()
