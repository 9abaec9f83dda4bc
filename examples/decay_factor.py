"""Soma's decay factor on the fashion-MNIST MLP (soma paper, Fig. 3).

What it shows: how the momentum of `keras_soma.Soma` (the paper's decay
factor gamma of the moving average whose sign is the step) changes
training. The paper's Flatten-128-64-10 ReLU network is trained with Soma
at momentum 0.001 (almost signSGD: the sign of each batch's own
gradient), 0.5 and 0.999 (a very long average), all other arguments at
their defaults (batch 64, 5 epochs), from the same initial weights.
Writes `decay_factor.png` (training loss per batch, smoothed by an
exponential moving average with factor 0.95 as in the paper),
`decay_factor.md` and `decay_factor.csv` (final smoothed loss, test
accuracy, seconds per epoch, state bytes per parameter) to `--output-dir`.

Run time on a 2-core laptop CPU: under a minute per decay factor for the
full 5 epochs; `--epochs 1 --steps-per-epoch 50` takes seconds (plus about
10 s to decode the dataset once).

    python examples/decay_factor.py
    python examples/decay_factor.py --momentums 0.9 0.95 0.99
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fashion_mnist_common as common  # noqa: E402

EPOCHS = 5
BATCH_SIZE = 64
SEED = 0
OUTPUT_DIR = "results"
MOMENTUMS = [0.001, 0.5, 0.999]

COLUMNS = [
    ("optimizer", "optimizer", "{}"),
    ("momentum", "momentum (decay factor)", "{:g}"),
    *common.TABLE_COLUMNS[1:],
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--momentums",
        type=float,
        nargs="+",
        default=MOMENTUMS,
        help="Soma momentums (decay factors) to compare, each in [0, 1); "
        f"default: {' '.join(str(value) for value in MOMENTUMS)}",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="Soma's learning rate; default: Soma's default",
    )
    common.add_common_arguments(parser, EPOCHS, BATCH_SIZE, SEED, OUTPUT_DIR)
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    outside = [value for value in args.momentums if not 0.0 <= value < 1.0]
    if outside:
        parser.error(f"--momentums must each lie in [0, 1); received {outside}")
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0; received {args.learning_rate}")
    return args


def main(argv=None):
    args = parse_args(argv)
    train, test = common.load_data(args)
    rows = []
    for momentum in args.momentums:
        print(f"\n=== Soma, momentum {momentum:g} ===", flush=True)
        row = common.train_and_evaluate(
            common.build_mlp,
            "soma",
            train,
            test,
            epochs=args.epochs,
            seed=args.seed,
            learning_rate=args.learning_rate,
            momentum=momentum,
        )
        row["momentum"] = momentum
        row["run"] = f"momentum {momentum:g}"
        print(f"{row['run']}: test accuracy {row['test_accuracy']:.4f}", flush=True)
        rows.append(row)
    paths = common.write_outputs(
        rows,
        args.output_dir,
        "decay_factor",
        f"Soma's decay factor, fashion-MNIST MLP, batch {args.batch_size}, "
        f"{common.epochs_text(args.epochs)}",
        common.command_line("examples/decay_factor.py", argv),
        columns=COLUMNS,
        label_key="run",
    )
    common.report(rows, paths, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
