"""Shared pieces of the fashion-MNIST examples: data, models, optimizers,
per-batch loss recording and the PNG / Markdown / CSV outputs.

Not an example by itself; the scripts beside it import it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import shlex
import sys
import time
from collections.abc import Sequence

import keras
import numpy as np

import keras_soma
from keras_soma.memory import state_bytes_per_parameter

NUM_CLASSES = 10
TRAIN_EXAMPLES = 60_000

# Each optimizer "at its defaults": the library's own default arguments.
OPTIMIZERS = {
    "soma": keras_soma.Soma,
    # Soma with its moving average stored as blockwise int8 (one byte per
    # parameter plus a float32 scale per block), else at its defaults.
    "soma-int8": functools.partial(keras_soma.Soma, momentum_dtype="int8"),
    "gradsign": keras_soma.GradSign,
    "adam": keras.optimizers.Adam,
    "adagrad": keras.optimizers.Adagrad,
    "rmsprop": keras.optimizers.RMSprop,
    "sgd": keras.optimizers.SGD,
    "lion": keras.optimizers.Lion,
    "sm3": keras_soma.SM3,
    # SM3 with its momentum stored as blockwise int8 (Soma's format), else
    # at its defaults.
    "sm3-int8": functools.partial(keras_soma.SM3, momentum_dtype="int8"),
}

DISPLAY_NAMES = {
    "soma": "Soma",
    "soma-int8": "Soma int8",
    "gradsign": "GradSign",
    "sm3": "SM3",
    "sm3-int8": "SM3 int8",
    "adam": "Adam",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
    "sgd": "SGD",
    "lion": "Lion",
}


# The learning-rate schedules `train_and_evaluate` offers.
SCHEDULES = ("constant", "cosine")


def make_optimizer(name: str, learning_rate: float | None = None, **kwargs):
    """A fresh optimizer by name, at its defaults unless told otherwise."""
    if name not in OPTIMIZERS:
        raise ValueError(
            f"Argument `optimizer` must be one of {sorted(OPTIMIZERS)}; "
            f"received: optimizer={name!r}"
        )
    if learning_rate is not None:
        kwargs["learning_rate"] = learning_rate
    return OPTIMIZERS[name](**kwargs)


# Where tfds keeps prepared datasets when neither `--data-dir` nor
# TFDS_DATA_DIR says otherwise.
DEFAULT_DATA_DIR_HELP = "TFDS_DATA_DIR, else ~/tensorflow_datasets"


@functools.cache
def _decoded_splits(data_dir: str | None, manual_dir: str | None):
    """The decoded, [0, 1]-scaled train and test splits, cached in memory.

    Cached per process so that a second run (another example called from
    the same Python process, as the tests do) does not decode the PNGs again.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def load(download: bool):
        download_and_prepare_kwargs = None
        if manual_dir is not None:
            download_and_prepare_kwargs = {
                "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)
            }
        return tfds.load(
            "fashion_mnist",
            split=["train", "test"],
            as_supervised=True,
            data_dir=data_dir,
            download=download,
            download_and_prepare_kwargs=download_and_prepare_kwargs,
        )

    try:
        train, test = load(download=False)
    except Exception:  # not prepared locally: let tfds build it
        source = f"the files in {manual_dir}" if manual_dir else "the internet"
        print(
            f"fashion_mnist is not prepared locally; tfds will build it from {source}."
        )
        try:
            train, test = load(download=True)
        except Exception as error:
            raise RuntimeError(
                "Could not load fashion_mnist with tensorflow-datasets: it is "
                f"not prepared in {data_dir or DEFAULT_DATA_DIR_HELP} and "
                f"building it from {source} failed ({error}). Offline, point "
                "--data-dir (or TFDS_DATA_DIR) at a directory holding "
                "fashion_mnist/3.0.1, or --manual-dir at a directory holding "
                "the four official .gz files (see docs/getting-started.md)."
            ) from error

    def normalize(image, label):
        return tf.cast(image, tf.float32) / 255.0, label

    train = train.map(normalize, num_parallel_calls=tf.data.AUTOTUNE).cache()
    test = test.map(normalize, num_parallel_calls=tf.data.AUTOTUNE).cache()
    # Fill the caches now with one full pass (a partial pass would throw
    # them away), so that no optimizer's epoch time includes decoding.
    train.reduce(0, lambda count, _: count)
    test.reduce(0, lambda count, _: count)
    return train, test


def load_fashion_mnist(
    batch_size: int,
    seed: int,
    steps_per_epoch: int | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
):
    """`(train, test)` tf.data pipelines of fashion-MNIST via tfds.

    Uses the prepared dataset in `data_dir` (default: `TFDS_DATA_DIR`, else
    tfds' default directory) when it is there; otherwise tfds builds it,
    from the official files in `manual_dir` when given, else downloading
    them. Pixels are scaled to [0, 1]; the training set is reshuffled every
    epoch with `seed`.

    The order of the batches depends on TensorFlow's global seed when the
    pipeline is built and on how often it was iterated before: runs that
    must see the same batches build their own pipeline after seeding
    (`train_and_evaluate` does, given `load_data`'s `make_train`).

    Args:
        batch_size: Training batch size (the test set uses 1024).
        seed: Seed of the training set's shuffle.
        steps_per_epoch: If given, each epoch takes only this many training
            batches (a short run). Defaults to `None`, the whole set.
        data_dir: tfds data directory. Defaults to `None` (tfds' choice).
        manual_dir: Directory holding the official fashion-MNIST `.gz`
            files, used instead of a download. Defaults to `None`.

    Returns:
        The training and test `tf.data.Dataset`s of `(image, label)`
        batches.
    """
    import tensorflow as tf

    train, test = _decoded_splits(data_dir, manual_dir)
    train = train.shuffle(TRAIN_EXAMPLES, seed=seed, reshuffle_each_iteration=True)
    train = train.batch(batch_size)
    if steps_per_epoch is not None:
        train = train.take(steps_per_epoch)
    test = test.batch(1024)
    return train.prefetch(tf.data.AUTOTUNE), test.prefetch(tf.data.AUTOTUNE)


def build_mlp() -> keras.Model:
    """The soma paper's Fig. 1 network: Flatten-128-64-10, ReLU."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ],
        name="mlp",
    )


def build_cnn() -> keras.Model:
    """The soma paper's Fig. 2 network: Conv(32,3)-Conv(64,3)-MaxPool(2)-
    Flatten-Dense(128)-Dense(10), ReLU."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ],
        name="cnn",
    )


class BatchLossRecorder(keras.callbacks.Callback):
    """Records the loss of every training batch.

    Keras 3 reports in `on_train_batch_end` the running mean over the epoch
    so far; the loss of batch k is recovered as
    `k * mean_k - (k - 1) * mean_(k-1)` (in float64).
    """

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []
        self.epoch_seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._previous_mean = 0.0
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        count = batch + 1
        self.losses.append(count * mean - (count - 1) * self._previous_mean)
        self._previous_mean = mean

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)


def smooth(values: Sequence[float], factor: float = 0.95) -> np.ndarray:
    """Exponential moving average, as the soma paper smooths its curves:
    s_t = factor * s_(t-1) + (1 - factor) * x_t, started at x_0."""
    smoothed = np.empty(len(values))
    current = values[0] if len(values) else 0.0
    for index, value in enumerate(values):
        current = factor * current + (1.0 - factor) * value
        smoothed[index] = current
    return smoothed


def train_and_evaluate(
    build_model,
    optimizer_name: str,
    train,
    test,
    epochs: int,
    seed: int,
    learning_rate: float | None = None,
    verbose: int = 2,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    schedule: str = "constant",
    **optimizer_kwargs,
) -> dict[str, object]:
    """Trains one model with one optimizer; returns its curve and figures.

    Args:
        build_model: A function returning a fresh, uncompiled model.
        optimizer_name: A key of `OPTIMIZERS`.
        train: The training dataset of `(image, label)` batches, or a
            function that builds it (`load_data`'s `make_train`). Given a
            function, it is called after seeding, so that every run sees
            the same batches in the same order; a dataset's order depends
            on how often it was iterated before.
        test: The test dataset; validated on after every epoch.
        epochs: Number of epochs.
        seed: Seed of the weight initialization.
        learning_rate: Overrides the optimizer's default learning rate.
            Defaults to `None`, the optimizer's default.
        verbose: Keras progress output (`model.fit(verbose=...)`).
            Defaults to `2`, one line per epoch.
        callbacks: More callbacks for `fit`. Defaults to none.
        schedule: One of `SCHEDULES`: `"constant"` keeps the learning rate,
            `"cosine"` decays it from its value to 0 over the run
            (`keras.optimizers.schedules.CosineDecay` over every step of
            every epoch). Defaults to `"constant"`.
        **optimizer_kwargs: More arguments of the optimizer's constructor.

    Returns:
        A dict: the optimizer's display name, its (initial) learning rate, the final
        smoothed training loss, the test accuracy, the mean seconds per
        epoch (training plus the validation pass), the optimizer state
        bytes per parameter, the per-batch losses and the smoothed curve,
        and the trained `model`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(
            f"Argument `schedule` must be one of {SCHEDULES}; "
            f"received: schedule={schedule!r}"
        )
    keras.utils.set_random_seed(seed)
    if callable(train):
        train = train()
    model = build_model()
    # Made with a constant rate first: a schedule starts from that rate.
    optimizer = make_optimizer(optimizer_name, learning_rate, **optimizer_kwargs)
    initial_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    if schedule == "cosine":
        steps = epochs * int(train.cardinality())
        if steps < 1:
            raise ValueError(
                "A cosine schedule needs a training set of known length; "
                f"received one of cardinality {int(train.cardinality())}"
            )
        optimizer = make_optimizer(
            optimizer_name,
            keras.optimizers.schedules.CosineDecay(initial_rate, steps),
            **optimizer_kwargs,
        )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    recorder = BatchLossRecorder()
    history = model.fit(
        train,
        epochs=epochs,
        validation_data=test,
        callbacks=[recorder, *callbacks],
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=verbose,
    )
    # The last epoch's validation pass ran on the whole test set with the
    # final weights: it is the test accuracy.
    test_accuracy = history.history["val_accuracy"][-1]
    smoothed = smooth(recorder.losses)
    return {
        "optimizer": DISPLAY_NAMES.get(optimizer_name, optimizer_name),
        "learning_rate": initial_rate,
        "final_smoothed_loss": float(smoothed[-1]),
        "test_accuracy": float(test_accuracy),
        "seconds_per_epoch": float(np.mean(recorder.epoch_seconds)),
        "state_bytes_per_parameter": state_bytes_per_parameter(
            optimizer, model.trainable_variables
        ),
        "losses": recorder.losses,
        "smoothed": smoothed,
        "model": model,
    }


def compare_optimizers(
    build_model,
    optimizer_names: Sequence[str],
    train,
    test,
    epochs: int,
    seed: int,
    learning_rate: float | None = None,
) -> list[dict[str, object]]:
    """Trains `build_model()` once per optimizer, each at its defaults
    (or at `learning_rate`), from the same initial weights; returns the
    rows of `train_and_evaluate`."""
    rows = []
    for name in optimizer_names:
        print(f"\n=== {DISPLAY_NAMES.get(name, name)} ===", flush=True)
        row = train_and_evaluate(
            build_model,
            name,
            train,
            test,
            epochs=epochs,
            seed=seed,
            learning_rate=learning_rate,
        )
        print(
            f"{row['optimizer']}: test accuracy {row['test_accuracy']:.4f}, "
            f"optimizer state {row['state_bytes_per_parameter']:.2f} bytes/param",
            flush=True,
        )
        rows.append(row)
    return rows


# ----------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------


def add_common_arguments(
    parser: argparse.ArgumentParser,
    epochs: int,
    batch_size: int,
    seed: int,
    output_dir: str,
) -> None:
    """Adds the arguments every example takes, with the given defaults:
    `--epochs --batch-size --seed --steps-per-epoch --output-dir
    --data-dir --manual-dir`."""
    parser.add_argument("--epochs", type=int, default=epochs, help=f"default: {epochs}")
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"default: {batch_size}"
    )
    parser.add_argument("--seed", type=int, default=seed, help=f"default: {seed}")
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="train on only this many batches per epoch (a short run); "
        "default: the whole training set",
    )
    parser.add_argument(
        "--output-dir",
        default=output_dir,
        help=f"where the PNG, Markdown and CSV go; default: {output_dir}",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"tfds data directory; default: {DEFAULT_DATA_DIR_HELP}",
    )
    parser.add_argument(
        "--manual-dir",
        default=None,
        help="directory holding the official fashion-MNIST .gz files, "
        "used instead of a download when the data is not prepared yet",
    )


def add_seeds_argument(parser: argparse.ArgumentParser, default: int) -> None:
    """Adds `--seeds`, how many seeds a multi-seed run takes from
    `--seed` on."""
    parser.add_argument(
        "--seeds",
        type=int,
        default=default,
        help=f"how many seeds, --seed, --seed + 1, ...; default: {default}",
    )


def add_schedule_argument(parser: argparse.ArgumentParser, which: str) -> None:
    """Adds `--schedule` (one of `SCHEDULES`) for the optimizers `which`
    names in its help."""
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        help=f"constant, or cosine decay to 0 over the run, for {which}; "
        "default: constant",
    )


def schedule_suffix(schedule: str, separator: str = "_") -> str:
    """What a run's file stem (`"_cosine"`) or label (`separator=" "`)
    gets for `schedule`: nothing for the constant rate."""
    return "" if schedule == "constant" else f"{separator}{schedule}"


def check_common_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Rejects out-of-range values of the common arguments with a message
    naming the argument, the valid range and the value received."""
    for name in ("epochs", "batch_size", "steps_per_epoch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be an integer >= 1; received {value}"
            )
    # The output and data directories are created when missing.
    for name in ("output_dir", "data_dir"):
        value = getattr(args, name)
        if value is not None and os.path.exists(value) and not os.path.isdir(value):
            parser.error(
                f"--{name.replace('_', '-')} must be a directory; received "
                f"{value!r}, which is a file"
            )
    if args.manual_dir is not None and not os.path.isdir(args.manual_dir):
        parser.error(
            f"--manual-dir must be an existing directory; received {args.manual_dir!r}"
        )


def load_data(args, seed: int | None = None):
    """`(make_train, test)`: `make_train()` builds the training pipeline of
    `load_fashion_mnist` with the common arguments of `args`, anew on each
    call (see `train_and_evaluate`); `test` is the test set. `seed`, when
    given, replaces `args.seed` (one seed of a multi-seed run)."""

    load = functools.partial(
        load_fashion_mnist,
        args.batch_size,
        args.seed if seed is None else seed,
        args.steps_per_epoch,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
    )

    def make_train():
        return load()[0]

    return make_train, load()[1]


def epochs_text(epochs: int) -> str:
    """ "1 epoch", "5 epochs"."""
    return f"{epochs} epoch" + ("" if epochs == 1 else "s")


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The shell command that ran `script` with `argv` (default: this
    process's arguments), for the "Produced by" line of the outputs."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return "python " + " ".join(shlex.quote(part) for part in [script, *arguments])


TABLE_COLUMNS = [
    ("optimizer", "optimizer", "{}"),
    ("learning_rate", "learning rate", "{:g}"),
    ("final_smoothed_loss", "final smoothed loss", "{:.4f}"),
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("seconds_per_epoch", "seconds / epoch", "{:.1f}"),
    ("state_bytes_per_parameter", "state bytes / param", "{:.2f}"),
]


def format_table(rows: Sequence[dict[str, object]], columns=TABLE_COLUMNS) -> str:
    """A Markdown table of `rows` (dicts) with the given columns."""
    header = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    """The processor, its core count and the Keras version and backend,
    e.g. for "Produced by ... on <machine>"."""
    import platform

    processor = platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    processor = f"{line.split(':', 1)[1].strip()} ({processor})"
                    break
    except OSError:  # not Linux
        pass
    backend = keras.backend.backend()
    versions = f"Keras {keras.__version__} on {backend}"
    if backend in ("tensorflow", "jax"):
        versions += f" {__import__(backend).__version__}"
    return f"{processor}, {os.cpu_count()} CPU cores, {versions}"


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def output_paths(output_dir: str, stem: str) -> dict[str, str]:
    """`{"png": ..., "md": ..., "csv": ...}` under `output_dir`, created."""
    os.makedirs(output_dir, exist_ok=True)
    return {
        extension: os.path.join(output_dir, f"{stem}.{extension}")
        for extension in ("png", "md", "csv")
    }


def write_tables(
    rows: Sequence[dict[str, object]],
    paths: dict[str, str],
    title: str,
    command: str,
    columns=TABLE_COLUMNS,
) -> None:
    """Writes `rows` as the Markdown table `paths["md"]`, which says which
    command produced it and on what machine, and as `paths["csv"]` (full
    precision)."""
    table = format_table(rows, columns)
    machine = machine_description()
    with open(paths["md"], "w") as handle:
        handle.write(f"{title}\n\n{table}\n\nProduced by `{command}` on {machine}.\n")
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key for key, _, _ in columns])
        for row in rows:
            writer.writerow([row[key] for key, _, _ in columns])


def report(rows: Sequence[dict[str, object]], paths, columns=TABLE_COLUMNS) -> None:
    """Prints `rows` as a table and the output files at a run's end."""
    print("\n" + format_table(rows, columns))
    print(f"\nWrote {paths['png']}, {paths['md']}, {paths['csv']}")


def write_outputs(
    rows: Sequence[dict[str, object]],
    output_dir: str,
    stem: str,
    title: str,
    command: str,
    columns=TABLE_COLUMNS,
    curve_key: str = "smoothed",
    label_key: str = "optimizer",
) -> dict[str, str]:
    """Writes `<stem>.png` (smoothed loss curves), `<stem>.md` and
    `<stem>.csv`; returns their paths. The Markdown file says which command
    produced it and on what machine."""
    import matplotlib.ticker

    plt = pyplot()
    paths = output_paths(output_dir, stem)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        axes.plot(row[curve_key], label=str(row[label_key]), linewidth=1.2)
    axes.set_xlabel("training step (batch)")
    axes.set_ylabel("training loss (EMA 0.95)")
    axes.set_title(title)
    axes.set_yscale("log")
    # Plain numbers (0.3, 0.4, 2) on the log axis rather than 3 x 10^-1.
    plain = matplotlib.ticker.FormatStrFormatter("%g")
    axes.yaxis.set_major_formatter(plain)
    axes.yaxis.set_minor_formatter(plain)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=120)
    plt.close(figure)
    write_tables(rows, paths, title, command, columns)
    return paths


# ---------------------------------------------------------------------------
# The optimizer comparisons of the paper's Fig. 1 (MLP) and Fig. 2 (CNN)
# ---------------------------------------------------------------------------

COMPARISON_EPOCHS = 5
COMPARISON_BATCH_SIZE = 64
COMPARISON_SEED = 0
COMPARISON_OUTPUT_DIR = "results"
COMPARISON_OPTIMIZERS = ["soma", "gradsign", "sm3", "adam", "adagrad", "rmsprop", "sgd"]


def parse_comparison_args(description: str, argv=None):
    """Arguments of a comparison script: `--optimizer` (one or more, each at
    its defaults), `--learning-rate`, and the common ones."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--optimizer",
        nargs="+",
        default=COMPARISON_OPTIMIZERS,
        choices=sorted(OPTIMIZERS),
        help="one or more optimizers, each at its defaults; "
        f"default: {' '.join(COMPARISON_OPTIMIZERS)}",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="override every optimizer's default learning rate",
    )
    add_common_arguments(
        parser,
        COMPARISON_EPOCHS,
        COMPARISON_BATCH_SIZE,
        COMPARISON_SEED,
        COMPARISON_OUTPUT_DIR,
    )
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0; received {args.learning_rate}")
    return args


def run_comparison(
    args, build_model, stem: str, model_title: str, script: str, argv=None
):
    """Trains `build_model()` with each chosen optimizer, then writes
    `<stem>.png/.md/.csv` and prints the table; returns the rows."""
    train, test = load_data(args)
    rows = compare_optimizers(
        build_model,
        args.optimizer,
        train,
        test,
        epochs=args.epochs,
        seed=args.seed,
        learning_rate=args.learning_rate,
    )
    paths = write_outputs(
        rows,
        args.output_dir,
        stem,
        f"Fashion-MNIST {model_title}, batch {args.batch_size}, "
        f"{epochs_text(args.epochs)}",
        command_line(script, argv),
    )
    report(rows, paths)
    return rows
