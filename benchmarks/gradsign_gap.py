"""Why GradSign trails Adam: the sign of an average, or an average of signs?

What it measures, on the soma paper's fashion-MNIST MLP (batch 64, 5
epochs, the seeds of the comparisons), the test accuracy of:

* GradSign at its defaults, and with the best learning rate of the cosine
  sweep on the GradSign page (1e-3 decayed to 0 over the run);
* the same rule without quantization: a float32 moving average of the
  gradient's *sign*, `a <- beta * a + (1 - beta) * sign(g)`, the variable
  moving by `learning_rate * a` (written here only, for the study), with
  GradSign's time scale of 8 steps (beta 0.875) and longer ones (20, 80);
* Soma, the sign of a moving average of the *gradient*, at GradSign's time
  scale (momentum 0.875) and at its default (0.95);
* Adam at its defaults.

If the float sign average lands where GradSign does while Soma at the same
time scale lands near Adam, the gap is the order of averaging and sign,
not the int8 counter, the schedule or the time scale: no learning rate or
schedule of GradSign's rule closes it. Writes `gradsign_gap.md`, `.csv`
and `.png` (smoothed loss curves of the first seed) to `--output-dir`.

Run time on a 2-core CPU: about 30-40 s per run, so about 5 minutes per
seed for the 8 variants.

    python benchmarks/gradsign_gap.py --output-dir docs/results
    python benchmarks/gradsign_gap.py --seeds 3 --variant gradsign soma adam
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from keras import ops  # noqa: E402

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
)

import fashion_mnist_common as common  # noqa: E402

import keras_soma  # noqa: E402

SEEDS = 1
COSINE_RATE = 1e-3  # the best of the cosine sweep on the GradSign page


class SignAverage(keras.optimizers.Optimizer):
    """A float32 moving average of the gradient's sign (study only):
    GradSign's rule without its int8 counter."""

    def __init__(self, learning_rate=COSINE_RATE, beta=0.875, name="sign_average"):
        super().__init__(learning_rate=learning_rate, name=name)
        self.beta = beta

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._averages = [
            self.add_variable_from_reference(variable, "sign_average")
            for variable in var_list
        ]

    def update_step(self, gradient, variable, learning_rate):
        average = self._averages[self._get_variable_index(variable)]
        self.assign(
            average,
            ops.add(
                ops.multiply(self.beta, average),
                ops.multiply(1.0 - self.beta, ops.sign(gradient)),
            ),
        )
        self.assign_sub(variable, ops.multiply(learning_rate, average))


# name: (description, what is averaged, time scale in steps, constructor,
# learning rate (None: the optimizer's default), schedule)
VARIANTS = {
    "gradsign": (
        "GradSign, defaults",
        "sign, int8",
        8,
        keras_soma.GradSign,
        None,
        "constant",
    ),
    "gradsign-cosine": (
        "GradSign, cosine",
        "sign, int8",
        8,
        keras_soma.GradSign,
        COSINE_RATE,
        "cosine",
    ),
    "sign-average-8": (
        "float sign average, beta 0.875",
        "sign, float32",
        8,
        functools.partial(SignAverage, beta=0.875),
        COSINE_RATE,
        "cosine",
    ),
    "sign-average-20": (
        "float sign average, beta 0.95",
        "sign, float32",
        20,
        functools.partial(SignAverage, beta=0.95),
        COSINE_RATE,
        "cosine",
    ),
    "sign-average-80": (
        "float sign average, beta 0.9875",
        "sign, float32",
        80,
        functools.partial(SignAverage, beta=0.9875),
        COSINE_RATE,
        "cosine",
    ),
    "soma-8": (
        "Soma, momentum 0.875",
        "gradient, float32",
        8,
        functools.partial(keras_soma.Soma, momentum=0.875),
        None,
        "constant",
    ),
    "soma": (
        "Soma, defaults",
        "gradient, float32",
        20,
        keras_soma.Soma,
        None,
        "constant",
    ),
    "adam": (
        "Adam, defaults",
        "gradient (and its square), float32",
        10,
        keras.optimizers.Adam,
        None,
        "constant",
    ),
}

COLUMNS = [
    ("run", "variant", "{}"),
    ("averaged", "moving average of", "{}"),
    ("time_scale", "time scale (steps)", "{}"),
    ("learning_rate", "learning rate", "{:g}"),
    ("schedule", "schedule", "{}"),
    ("mean_test_accuracy", "mean test accuracy", "{:.4f}"),
    ("per_seed", "per seed", "{}"),
    ("final_smoothed_loss", "final smoothed loss (first seed)", "{:.4f}"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="default: all, in this order",
    )
    common.add_seeds_argument(parser, SEEDS)
    common.add_common_arguments(
        parser,
        common.COMPARISON_EPOCHS,
        common.COMPARISON_BATCH_SIZE,
        common.COMPARISON_SEED,
        common.COMPARISON_OUTPUT_DIR,
    )
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    if args.seeds < 1:
        parser.error(f"--seeds must be an integer >= 1; received {args.seeds}")
    return args


def train_variants(args, seeds, runs) -> None:
    """Trains every variant of `args.variant` for every seed of `seeds`;
    appends the rows of `train_and_evaluate` to `runs[variant]`."""
    for seed in seeds:
        # Built per run after seeding (see `load_data`): every variant sees
        # the same batches in the same order.
        make_train, test = common.load_data(args, seed)
        for name in args.variant:
            description, _, _, constructor, rate, schedule = VARIANTS[name]
            common.OPTIMIZERS["study"] = constructor
            row = common.train_and_evaluate(
                common.build_mlp,
                "study",
                make_train,
                test,
                args.epochs,
                seed,
                learning_rate=rate,
                verbose=0,
                schedule=schedule,
            )
            runs[name].append(row)
            print(
                f"seed {seed} {description}: test accuracy "
                f"{row['test_accuracy']:.4f} "
                f"({row['seconds_per_epoch']:.1f} s / epoch)",
                flush=True,
            )


def main(argv=None):
    args = parse_args(argv)
    command = common.command_line("benchmarks/gradsign_gap.py", argv)
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = {name: [] for name in args.variant}
    try:
        train_variants(args, seeds, runs)
    finally:
        common.OPTIMIZERS.pop("study", None)
    rows = []
    for name in args.variant:
        description, averaged, time_scale, _, _, schedule = VARIANTS[name]
        accuracies = [row["test_accuracy"] for row in runs[name]]
        first = runs[name][0]
        rows.append(
            {
                "run": description,
                "averaged": averaged,
                "time_scale": time_scale,
                "learning_rate": first["learning_rate"],
                "schedule": schedule,
                "mean_test_accuracy": statistics.fmean(accuracies),
                "per_seed": " ".join(f"{value:.4f}" for value in accuracies),
                "final_smoothed_loss": first["final_smoothed_loss"],
                "smoothed": first["smoothed"],
            }
        )
    seed_text = (
        f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    )
    paths = common.write_outputs(
        rows,
        args.output_dir,
        "gradsign_gap",
        f"Sign of an average or average of signs, fashion-MNIST MLP, "
        f"batch {args.batch_size}, {common.epochs_text(args.epochs)}, {seed_text}",
        command,
        columns=COLUMNS,
        label_key="run",
    )
    common.report(rows, paths, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
