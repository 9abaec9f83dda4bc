"""The language model's learning-rate and weight-decay sweep: every
optimizer with the same budget.

What it does: for each optimizer of `examples/shakespeare_lm.py`, trains
the example's model (its defaults, or `--quick`) for `--steps` steps at
the optimizer's default learning rate times each of `--lr-factors`; then,
for the optimizers that decay their weights by default (AdamW, Lion and
Soma in every precision), at the best of those rates with the default
weight decay times each of `--wd-factors`. Every optimizer gets the same
number of learning rates, and every decaying one the same number of decays
on top. The same seed, initial weights and batches for every run; the
validation loss (nats per character, raw and Polyak-averaged weights) is
the example's.

The sweep runs shorter than the comparison (600 steps by default, against
the example's 2000) so that it fits a CPU; its best settings are then
worth checking at full length with `examples/shakespeare_lm.py
--learning-rate RATE --weight-decay DECAY`.

Writes to `--output-dir`: `shakespeare_lm_sweep.png` (validation loss
against learning rate, one line per optimizer, weight-decay trials as
crosses), `shakespeare_lm_sweep.md` (the table, best of each optimizer in
bold) and `shakespeare_lm_sweep.csv`.

Run time on a 2-core CPU (JAX): about 1.5 minutes per run at 600 steps,
so about 45 minutes for the default 30 runs.

    python examples/shakespeare_lm_sweep.py --text-dir texts/
    python examples/shakespeare_lm_sweep.py --optimizer soma --lr-factors 0.5 1 2 4
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fashion_mnist_common as common  # noqa: E402
import shakespeare_lm as lm  # noqa: E402

DEFAULT_OPTIMIZERS = [
    "adamw",
    "lion",
    "soma",
    "soma-bf16",
    "soma-int8",
    "gradsign",
    "sm3",
    "sm3-m0",
]
LR_FACTORS = (0.5, 1.0, 2.0)
WD_FACTORS = (0.25, 4.0)
# The budget: weight decay is swept for AdamW, Lion and Soma.
DECAY_SWEPT = ("adamw", "lion", "soma")
STEPS = 600
OUTPUT_DIR = "results"
OUTPUT_STEM = "shakespeare_lm_sweep"
# The example's columns less the train loss and the state (one per run).
COLUMNS = [
    column
    for column in lm.COLUMNS
    if column[0] not in ("train_loss", "state_bytes_per_parameter")
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--optimizer",
        nargs="+",
        default=DEFAULT_OPTIMIZERS,
        choices=sorted(
            name for name in lm.OPTIMIZERS if name not in lm.VOTE_OPTIMIZERS
        ),
        help="the optimizers to sweep; default: " + " ".join(DEFAULT_OPTIMIZERS),
    )
    for flag, nargs, factors, what in [
        ("--lr-factors", "+", LR_FACTORS, "each optimizer's default learning rate"),
        (
            "--wd-factors",
            "*",
            WD_FACTORS,
            "the default weight decay, tried at the best learning rate for "
            + ", ".join(DECAY_SWEPT),
        ),
    ]:
        parser.add_argument(
            flag,
            type=float,
            nargs=nargs,
            default=list(factors),
            help=f"multiples of {what}; default: "
            + " ".join(f"{factor:g}" for factor in factors),
        )
    parser.add_argument(
        "--steps", type=int, default=STEPS, help=f"steps per run; default: {STEPS}"
    )
    parser.add_argument("--seed", type=int, default=lm.SEED)
    parser.add_argument(
        "--quick", action="store_true", help="the example's tiny model (a smoke test)"
    )
    parser.add_argument("--text-dir", default=None, help="as in shakespeare_lm.py")
    parser.add_argument("--text-pattern", default=lm.TEXT_PATTERN)
    parser.add_argument("--output-dir", default=OUTPUT_DIR)
    parser.add_argument("--output-stem", default=OUTPUT_STEM)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be an integer >= 1; received {args.steps}")
    for name in ("lr_factors", "wd_factors"):
        values = getattr(args, name)
        if any(not value > 0 for value in values):
            parser.error(
                f"--{name.replace('_', '-')} must all be > 0; received {values}"
            )
    if len(set(args.lr_factors)) < 2:
        parser.error(
            "--lr-factors must hold at least 2 different values (a sweep); "
            f"received {args.lr_factors}"
        )
    return args


def example_args(args):
    """The example's arguments for one run of the sweep (no samples)."""
    argv = ["--steps", str(args.steps), "--seed", str(args.seed)]
    argv += ["--eval-every", str(args.steps), "--sample-characters", "1"]
    argv += ["--output-dir", args.output_dir]
    if args.quick:
        argv.append("--quick")
    if args.text_dir is not None:
        argv += ["--text-dir", args.text_dir, "--text-pattern", args.text_pattern]
    return lm.parse_args(argv)


def default_settings(name: str, steps: int) -> tuple[float, float]:
    """`(learning rate, weight decay)` of the example's optimizer `name`."""
    optimizer = lm.make_optimizer(name, steps)
    return lm.plateau_learning_rate(optimizer), float(optimizer.weight_decay or 0.0)


def sweep(args, vocabulary, train, validation) -> list[dict]:
    """One row per run, in the order run."""
    rows = []
    total = sum(
        len(args.lr_factors) + (len(args.wd_factors) if name in DECAY_SWEPT else 0)
        for name in args.optimizer
    )
    settings = example_args(args)

    def run(name, learning_rate, weight_decay):
        settings.learning_rate = learning_rate
        settings.weight_decay = weight_decay
        began = time.perf_counter()
        result = lm.train_one(name, settings, vocabulary, train, validation)
        row = {key: result[key] for key, _, _ in COLUMNS}
        row["key"] = name
        rows.append(row)
        print(
            f"[{len(rows)}/{total}] {row['optimizer']} learning rate "
            f"{learning_rate:g}, weight decay {weight_decay:g}: val loss "
            f"{row['val_loss']:.4f} ({time.perf_counter() - began:.0f} s)",
            flush=True,
        )
        return row

    for name in args.optimizer:
        rate, decay = default_settings(name, args.steps)
        tried = [run(name, rate * factor, decay) for factor in args.lr_factors]
        if name in DECAY_SWEPT and decay > 0:
            best = min(tried, key=best_key)
            for factor in args.wd_factors:
                run(name, best["learning_rate"], decay * factor)
    return rows


def best_key(row: dict) -> float:
    """Rows sort by validation loss; a diverged (NaN) run sorts last."""
    loss = row["val_loss"]
    return loss if math.isfinite(loss) else math.inf


def best_rows(rows: list[dict]) -> dict[str, dict]:
    """The row of lowest validation loss of each optimizer."""
    best = {}
    for row in rows:
        if row["key"] not in best or best_key(row) < best_key(best[row["key"]]):
            best[row["key"]] = row
    return best


def write_outputs(rows, args, command: str) -> dict:
    plt = common.pyplot()
    paths = common.output_paths(args.output_dir, args.output_stem)
    best = best_rows(rows)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, name in enumerate(dict.fromkeys(row["key"] for row in rows)):
        own = [row for row in rows if row["key"] == name]
        decay = own[0]["weight_decay"]
        rates = [row for row in own if row["weight_decay"] == decay]
        rates.sort(key=lambda row: row["learning_rate"])
        axes.plot(
            [row["learning_rate"] for row in rates],
            [row["val_loss"] for row in rates],
            marker="o",
            color=f"C{index}",
            label=own[0]["optimizer"],
        )
        decays = [row for row in own if row["weight_decay"] != decay]
        axes.plot(
            [row["learning_rate"] for row in decays],
            [row["val_loss"] for row in decays],
            linestyle="none",
            marker="x",
            color=f"C{index}",
        )
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (SM3: the plateau of its schedule)")
    axes.set_ylabel("validation loss (nats / character)")
    axes.set_title(
        f"Character LM, {args.steps} steps, seed {args.seed}: learning-rate sweep\n"
        "(crosses: other weight decays at the best rate)",
        fontsize=10,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=120)
    plt.close(figure)

    table_rows = []
    for row in rows:
        shown = dict(row)
        if best[row["key"]] is row:
            shown["optimizer"] = f"**{row['optimizer']}**"
        table_rows.append(shown)
    title = (
        f"Learning-rate and weight-decay sweep of the character LM: {args.steps} "
        f"steps, seed {args.seed}; each optimizer's best run in bold."
    )
    common.write_tables(table_rows, paths, title, command, COLUMNS)
    return paths


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    settings = example_args(args)
    train_text, held_out_text, description = lm.load_texts(settings)
    vocabulary = lm.CharacterVocabulary(train_text + held_out_text)
    train = lm.random_windows(
        vocabulary.encode(train_text),
        args.steps * settings.batch_size,
        settings.context,
        args.seed,
    )
    validation = lm.random_windows(
        vocabulary.encode(held_out_text),
        settings.eval_windows,
        settings.context,
        args.seed + 1,
    )
    print(f"{description}; vocabulary of {len(vocabulary)} characters", flush=True)
    rows = sweep(args, vocabulary, train, validation)
    paths = write_outputs(
        rows, args, common.command_line("examples/shakespeare_lm_sweep.py", argv)
    )
    print("\nBest of each optimizer:")
    print(common.format_table(list(best_rows(rows).values()), COLUMNS))
    common.report(rows, paths, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
