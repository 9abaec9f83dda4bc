"""Soma against Adam over several seeds: is the gap larger than the noise?

What it shows: one run of an optimizer comparison is one draw. A different
seed (the initial weights and the order of the training batches) moves a
5-epoch test accuracy on fashion-MNIST by as much as the differences
between optimizers that the single-seed tables show. This script trains
the soma paper's MLP (or CNN) with each optimizer at its defaults for
several seeds, every optimizer seeing the same seeds, and writes
`seeds_<model>.png` (each seed's test accuracy and the mean, per
optimizer), `seeds_<model>.md` and `seeds_<model>.csv` (mean, standard
deviation, range, and the per-seed accuracies) to `--output-dir`.

Run time on a 2-core CPU: 20-30 s per MLP run, so about 5 minutes for
the default two optimizers and five seeds; `--seeds 2 --epochs 1
--steps-per-epoch 20` takes seconds (plus about 10 s to decode the dataset
once).

    python examples/seed_repeats.py                              # Soma, Adam
    python examples/seed_repeats.py --optimizer soma adam sm3 --seeds 3
    python examples/seed_repeats.py --optimizer gradsign --learning-rate 1e-3 \
        --schedule cosine        # one rate and schedule for every optimizer
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fashion_mnist_common as common  # noqa: E402

# The paper's settings, as in the single-seed comparisons, over SEEDS seeds
# starting at SEED.
EPOCHS = common.COMPARISON_EPOCHS
BATCH_SIZE = common.COMPARISON_BATCH_SIZE
SEED = common.COMPARISON_SEED
SEEDS = 5
OUTPUT_DIR = common.COMPARISON_OUTPUT_DIR
DEFAULT_OPTIMIZERS = ["soma", "adam"]
MODELS = {"mlp": (common.build_mlp, "MLP"), "cnn": (common.build_cnn, "CNN")}

SUMMARY_COLUMNS = [
    ("optimizer", "optimizer", "{}"),
    ("seeds", "seeds", "{}"),
    ("mean_test_accuracy", "mean test accuracy", "{:.4f}"),
    ("std_test_accuracy", "standard deviation", "{:.4f}"),
    ("min_test_accuracy", "lowest", "{:.4f}"),
    ("max_test_accuracy", "highest", "{:.4f}"),
    ("per_seed", "per seed", "{}"),
    ("state_bytes_per_parameter", "state bytes / param", "{:.2f}"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--optimizer",
        nargs="+",
        default=DEFAULT_OPTIMIZERS,
        choices=sorted(common.OPTIMIZERS),
        help="optimizers, each at its defaults; default: "
        + " ".join(DEFAULT_OPTIMIZERS),
    )
    common.add_seeds_argument(parser, SEEDS)
    parser.add_argument(
        "--model", default="mlp", choices=sorted(MODELS), help="default: mlp"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="one learning rate for every optimizer listed; default: each "
        "optimizer's own",
    )
    common.add_schedule_argument(parser, "every optimizer listed")
    common.add_common_arguments(parser, EPOCHS, BATCH_SIZE, SEED, OUTPUT_DIR)
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0; received {args.learning_rate}")
    if args.seeds < 2:
        parser.error(
            "--seeds must be an integer >= 2 (a spread needs two runs); "
            f"received {args.seeds}"
        )
    return args


def summarize(name: str, runs) -> dict:
    """One table row: the test accuracies of `runs` (rows of
    `train_and_evaluate`, one per seed) summed up."""
    accuracies = [run["test_accuracy"] for run in runs]
    return {
        "optimizer": common.DISPLAY_NAMES.get(name, name),
        "seeds": len(runs),
        "mean_test_accuracy": statistics.mean(accuracies),
        "std_test_accuracy": statistics.stdev(accuracies),
        "min_test_accuracy": min(accuracies),
        "max_test_accuracy": max(accuracies),
        "per_seed": " ".join(f"{accuracy:.4f}" for accuracy in accuracies),
        "accuracies": accuracies,
        "state_bytes_per_parameter": runs[0]["state_bytes_per_parameter"],
    }


def plot(summaries, path: str, title: str) -> None:
    """Each seed's test accuracy as a dot and the mean as a bar, per
    optimizer."""
    plt = common.pyplot()
    figure, axes = plt.subplots(figsize=(max(4.0, 1.6 * len(summaries) + 1.5), 4.5))
    for position, summary in enumerate(summaries):
        accuracies = summary["accuracies"]
        axes.scatter(
            [position] * len(accuracies), accuracies, s=28, alpha=0.8, zorder=3
        )
        axes.hlines(
            summary["mean_test_accuracy"],
            position - 0.25,
            position + 0.25,
            colors="black",
            zorder=4,
        )
    axes.set_xticks(range(len(summaries)))
    axes.set_xticklabels([summary["optimizer"] for summary in summaries])
    axes.set_xlim(-0.6, len(summaries) - 0.4)
    axes.set_ylabel("test accuracy (dots: seeds, bar: mean)")
    axes.set_title(title)
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    build_model, model_title = MODELS[args.model]
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = {name: [] for name in args.optimizer}
    for seed in seeds:
        # The seed sets the training set's order as well as the weights;
        # each run builds its own pipeline (after seeding), so that every
        # optimizer sees the same batches in the same order.
        make_train, test = common.load_data(args, seed)
        for name in args.optimizer:
            row = common.train_and_evaluate(
                build_model,
                name,
                make_train,
                test,
                epochs=args.epochs,
                seed=seed,
                learning_rate=args.learning_rate,
                schedule=args.schedule,
            )
            runs[name].append(row)
            print(
                f"seed {seed} {row['optimizer']:>8}: "
                f"test accuracy {row['test_accuracy']:.4f} "
                f"({row['seconds_per_epoch']:.1f} s / epoch)",
                flush=True,
            )
    summaries = [summarize(name, runs[name]) for name in args.optimizer]
    title = (
        f"Fashion-MNIST {model_title}, batch {args.batch_size}, "
        f"{common.epochs_text(args.epochs)}, seeds {seeds[0]}-{seeds[-1]}"
    )
    stem = f"seeds_{args.model}"
    if args.learning_rate is not None:
        title += f", learning rate {args.learning_rate:g}"
        stem += f"_lr{args.learning_rate:g}"
    if args.schedule != "constant":
        title += f", {args.schedule} schedule"
    stem += common.schedule_suffix(args.schedule)
    paths = common.output_paths(args.output_dir, stem)
    plot(summaries, paths["png"], title)
    common.write_tables(
        summaries,
        paths,
        title,
        common.command_line("examples/seed_repeats.py", argv),
        SUMMARY_COLUMNS,
    )
    common.report(summaries, paths, SUMMARY_COLUMNS)
    return summaries


if __name__ == "__main__":
    main()
