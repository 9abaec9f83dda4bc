"""Learning-rate sweep on the fashion-MNIST MLP: how each default was chosen.

What it shows: test accuracy and final smoothed training loss of one
optimizer over a grid of learning rates, on the soma paper's MLP (batch 64,
5 epochs), beside Adam at its default. keras_soma's default learning rates
for GradSign and SM3 were picked from this script's tables (docs/).
Writes `sweep_<optimizer>.png` (loss curves), `.md` and `.csv`.

Run time on a 2-core laptop CPU: about 20-60 s per learning rate.

    python examples/learning_rate_sweep.py --optimizer gradsign \\
        --learning-rates 1e-4 3e-4 1e-3 3e-3 1e-2
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
LEARNING_RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
OUTPUT_DIR = "results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", required=True, choices=sorted(common.OPTIMIZERS))
    parser.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=LEARNING_RATES,
        help=f"default: {' '.join(f'{rate:g}' for rate in LEARNING_RATES)}",
    )
    common.add_schedule_argument(
        parser, "the optimizer swept from each rate (Adam stays at its default)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the Adam row")
    common.add_common_arguments(parser, EPOCHS, BATCH_SIZE, SEED, OUTPUT_DIR)
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    if any(not rate > 0 for rate in args.learning_rates):
        parser.error(
            f"--learning-rates must all be > 0; received {args.learning_rates}"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    train, test = common.load_data(args)
    runs = [(args.optimizer, rate) for rate in args.learning_rates]
    if not args.no_baseline:
        runs.append(("adam", None))
    rows = []
    for name, rate in runs:
        print(
            f"\n=== {common.DISPLAY_NAMES[name]} lr={rate if rate else 'default'} ===",
            flush=True,
        )
        row = common.train_and_evaluate(
            common.build_mlp,
            name,
            train,
            test,
            args.epochs,
            args.seed,
            rate,
            # The Adam baseline (rate None) stays at its default, constant.
            schedule=args.schedule if rate is not None else "constant",
        )
        row["run"] = f"{row['optimizer']} lr={row['learning_rate']:g}"
        if rate is not None:
            row["run"] += common.schedule_suffix(args.schedule, " ")
        print(f"{row['run']}: test accuracy {row['test_accuracy']:.4f}", flush=True)
        rows.append(row)
    command = common.command_line("examples/learning_rate_sweep.py", argv)
    paths = common.write_outputs(
        rows,
        args.output_dir,
        f"sweep_{args.optimizer}{common.schedule_suffix(args.schedule)}",
        f"Learning-rate sweep, {common.DISPLAY_NAMES[args.optimizer]}"
        + ("" if args.schedule == "constant" else f" ({args.schedule} schedule)")
        + f", fashion-MNIST MLP, batch {args.batch_size}, "
        f"{common.epochs_text(args.epochs)}",
        command,
        label_key="run",
    )
    common.report(rows, paths)


if __name__ == "__main__":
    main()
