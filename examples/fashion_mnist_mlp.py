"""Fashion-MNIST MLP: keras_soma against Keras's optimizers (soma paper, Fig. 1).

What it shows: the paper's Flatten-128-64-10 ReLU network trained with each
optimizer at its defaults (batch 64, 5 epochs), from the same initial
weights. Writes `mlp.png` (training loss per batch, smoothed by an
exponential moving average with factor 0.95 as in the paper), `mlp.md` and
`mlp.csv` (final smoothed loss, test accuracy, seconds per epoch, optimizer
state bytes per parameter) to `--output-dir`.

Run time on a 2-core laptop CPU: under a minute per optimizer for the full
5 epochs, about 7 minutes for all seven; `--epochs 1 --steps-per-epoch 50`
takes seconds (plus about 10 s to decode the dataset once).

    python examples/fashion_mnist_mlp.py                       # all optimizers
    python examples/fashion_mnist_mlp.py --optimizer soma adam
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
DEFAULT_OPTIMIZERS = [
    name
    for name in ("soma", "gradsign", "sm3", "adam", "adagrad", "rmsprop", "sgd")
    if name in common.OPTIMIZERS
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--optimizer",
        nargs="+",
        default=DEFAULT_OPTIMIZERS,
        choices=sorted(common.OPTIMIZERS),
        help="one or more optimizers, each at its defaults; "
        f"default: {' '.join(DEFAULT_OPTIMIZERS)}",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="override every optimizer's default learning rate",
    )
    common.add_common_arguments(parser, EPOCHS, BATCH_SIZE, SEED, OUTPUT_DIR)
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0; received {args.learning_rate}")
    return args


def main(argv=None):
    args = parse_args(argv)
    train, test = common.load_data(args)
    rows = common.compare_optimizers(
        common.build_mlp,
        args.optimizer,
        train,
        test,
        epochs=args.epochs,
        seed=args.seed,
        learning_rate=args.learning_rate,
    )
    paths = common.write_outputs(
        rows,
        args.output_dir,
        "mlp",
        f"Fashion-MNIST MLP, batch {args.batch_size}, {common.epochs_text(args.epochs)}",
        common.command_line("examples/fashion_mnist_mlp.py", argv),
    )
    print("\n" + common.format_table(rows))
    print(f"\nWrote {paths['png']}, {paths['md']}, {paths['csv']}")
    return rows


if __name__ == "__main__":
    main()
