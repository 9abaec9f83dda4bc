"""Shared pieces of the fashion-MNIST examples: data, models, optimizers,
per-batch loss recording and the PNG / Markdown / CSV outputs.

Not an example by itself; the scripts beside it import it.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np

import keras_soma
from keras_soma.memory import state_bytes_per_parameter

NUM_CLASSES = 10
TRAIN_EXAMPLES = 60_000

# Each optimizer "at its defaults": the library's own default arguments.
OPTIMIZERS = {
    "soma": keras_soma.Soma,
    "gradsign": keras_soma.GradSign,
    "adam": keras.optimizers.Adam,
    "adagrad": keras.optimizers.Adagrad,
    "rmsprop": keras.optimizers.RMSprop,
    "sgd": keras.optimizers.SGD,
    "lion": keras.optimizers.Lion,
}
if hasattr(keras_soma, "SM3"):
    OPTIMIZERS["sm3"] = keras_soma.SM3

DISPLAY_NAMES = {
    "soma": "Soma",
    "gradsign": "GradSign",
    "sm3": "SM3",
    "adam": "Adam",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
    "sgd": "SGD",
    "lion": "Lion",
}


def make_optimizer(name: str, learning_rate: Optional[float] = None, **kwargs):
    """A fresh optimizer by name, at its defaults unless told otherwise."""
    if name not in OPTIMIZERS:
        raise ValueError(
            f"Argument `optimizer` must be one of {sorted(OPTIMIZERS)}; "
            f"received: optimizer={name!r}"
        )
    if learning_rate is not None:
        kwargs["learning_rate"] = learning_rate
    return OPTIMIZERS[name](**kwargs)


def load_fashion_mnist(
    batch_size: int, seed: int, steps_per_epoch: Optional[int] = None
):
    """`(train, test)` tf.data pipelines of fashion-MNIST via tfds.

    Uses the prepared dataset in `TFDS_DATA_DIR` (or tfds' default
    directory) when it is there and lets tfds download it otherwise.
    Pixels are scaled to [0, 1]; the training set is reshuffled every
    epoch with `seed`.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def load(download: bool):
        return tfds.load(
            "fashion_mnist",
            split=["train", "test"],
            as_supervised=True,
            download=download,
        )

    try:
        train, test = load(download=False)
    except Exception:  # not prepared locally: let tfds fetch it
        print("fashion_mnist not found locally; tfds will download it.")
        train, test = load(download=True)

    def normalize(image, label):
        return tf.cast(image, tf.float32) / 255.0, label

    train = (
        train.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
        .cache()
        .shuffle(TRAIN_EXAMPLES, seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
    )
    if steps_per_epoch is not None:
        train = train.take(steps_per_epoch)
    test = (
        test.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
        .cache()
        .batch(1024)
    )
    train, test = train.prefetch(tf.data.AUTOTUNE), test.prefetch(tf.data.AUTOTUNE)
    # Fill the caches now, so that the first optimizer's epoch time does
    # not include reading and decoding the dataset.
    for _ in train:
        pass
    for _ in test:
        pass
    return train, test


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
        self.losses: List[float] = []
        self.epoch_seconds: List[float] = []

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
    learning_rate: Optional[float] = None,
    verbose: int = 2,
    **optimizer_kwargs,
) -> Dict[str, object]:
    """Trains one model with one optimizer; returns its curve and figures."""
    keras.utils.set_random_seed(seed)
    model = build_model()
    optimizer = make_optimizer(optimizer_name, learning_rate, **optimizer_kwargs)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    recorder = BatchLossRecorder()
    model.fit(
        train,
        epochs=epochs,
        validation_data=test,
        callbacks=[recorder],
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=verbose,
    )
    _, test_accuracy = model.evaluate(test, verbose=0)
    smoothed = smooth(recorder.losses)
    return {
        "optimizer": DISPLAY_NAMES.get(optimizer_name, optimizer_name),
        "learning_rate": float(
            keras.ops.convert_to_numpy(optimizer.learning_rate)
        ),
        "final_smoothed_loss": float(smoothed[-1]),
        "test_accuracy": float(test_accuracy),
        "seconds_per_epoch": float(np.mean(recorder.epoch_seconds)),
        "state_bytes_per_parameter": state_bytes_per_parameter(
            optimizer, model.trainable_variables
        ),
        "losses": recorder.losses,
        "smoothed": smoothed,
    }


TABLE_COLUMNS = [
    ("optimizer", "optimizer", "{}"),
    ("learning_rate", "learning rate", "{:g}"),
    ("final_smoothed_loss", "final smoothed loss", "{:.4f}"),
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("seconds_per_epoch", "seconds / epoch", "{:.1f}"),
    ("state_bytes_per_parameter", "state bytes / param", "{:.2f}"),
]


def format_table(rows: Sequence[Dict[str, object]], columns=TABLE_COLUMNS) -> str:
    """A Markdown table of `rows` (dicts) with the given columns."""
    header = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(
    rows: Sequence[Dict[str, object]],
    output_dir: str,
    stem: str,
    title: str,
    command: str,
    columns=TABLE_COLUMNS,
    curve_key: str = "smoothed",
    label_key: str = "optimizer",
) -> Dict[str, str]:
    """Writes `<stem>.png` (smoothed loss curves), `<stem>.md` and
    `<stem>.csv`; returns their paths. The Markdown file says which command
    produced it and on what machine."""
    import platform

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "png": os.path.join(output_dir, f"{stem}.png"),
        "md": os.path.join(output_dir, f"{stem}.md"),
        "csv": os.path.join(output_dir, f"{stem}.csv"),
    }
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        axes.plot(row[curve_key], label=str(row[label_key]), linewidth=1.2)
    axes.set_xlabel("training step (batch)")
    axes.set_ylabel("training loss (EMA 0.95)")
    axes.set_title(title)
    axes.set_yscale("log")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=120)
    plt.close(figure)

    table = format_table(rows, columns)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Keras {keras.__version__} ({keras.backend.backend()} backend)"
    )
    with open(paths["md"], "w") as handle:
        handle.write(f"{title}\n\n{table}\n\nProduced by `{command}` on {machine}.\n")
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key for key, _, _ in columns])
        for row in rows:
            writer.writerow([row[key] for key, _, _ in columns])
    return paths
