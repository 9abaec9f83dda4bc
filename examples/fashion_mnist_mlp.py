"""Fashion-MNIST MLP: keras_soma against Keras's optimizers (soma paper, Fig. 1).

What it shows: the paper's Flatten-128-64-10 ReLU network trained with each
optimizer at its defaults (batch 64, 5 epochs). Soma reaches Adam's test
accuracy with half of Adam's optimizer state; GradSign with an eighth.
Writes `mlp.png` (training loss, EMA-smoothed with factor 0.95 as in the
paper), `mlp.md` and `mlp.csv` (final smoothed loss, test accuracy, seconds
per epoch, optimizer state bytes per parameter) to `--output-dir`.

Run time on a 2-core laptop CPU: about 1 minute per optimizer for the
full 5 epochs; `--steps-per-epoch 50 --epochs 1` takes seconds.

    python examples/fashion_mnist_mlp.py                       # all optimizers
    python examples/fashion_mnist_mlp.py --optimizer soma adam
"""

from __future__ import annotations

import argparse
import os
import shlex
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
        help="one or more optimizers, each at its defaults",
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="override every optimizer's default learning rate",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="train on only this many batches per epoch (a short run)",
    )
    parser.add_argument("--output-dir", default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "steps_per_epoch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; received {value}")
    if args.learning_rate is not None and args.learning_rate <= 0:
        parser.error(f"--learning-rate must be > 0; received {args.learning_rate}")
    return args


def main(argv=None):
    args = parse_args(argv)
    train, test = common.load_fashion_mnist(
        args.batch_size, args.seed, args.steps_per_epoch
    )
    rows = []
    for name in args.optimizer:
        print(f"\n=== {common.DISPLAY_NAMES[name]} ===", flush=True)
        row = common.train_and_evaluate(
            common.build_mlp,
            name,
            train,
            test,
            epochs=args.epochs,
            seed=args.seed,
            learning_rate=args.learning_rate,
        )
        print(
            f"{row['optimizer']}: test accuracy {row['test_accuracy']:.4f}, "
            f"optimizer state {row['state_bytes_per_parameter']:.2f} bytes/param",
            flush=True,
        )
        rows.append(row)
    command = "python " + " ".join(
        shlex.quote(part) for part in ["examples/fashion_mnist_mlp.py", *sys.argv[1:]]
    )
    paths = common.write_outputs(
        rows,
        args.output_dir,
        "mlp",
        f"Fashion-MNIST MLP, batch {args.batch_size}, {args.epochs} epochs",
        command,
    )
    print("\n" + common.format_table(rows))
    print(f"\nWrote {paths['png']}, {paths['md']}, {paths['csv']}")
    return rows


if __name__ == "__main__":
    main()
