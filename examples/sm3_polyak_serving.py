"""SM3 with a warm-up schedule and Polyak averaging: train, export, serve.

What it shows: the serving story of keras_soma on fashion-MNIST. The soma
paper's MLP (Flatten-128-64-10, ReLU; batch 64, 5 epochs) is trained with
`keras_soma.SM3` at its default learning rate under
`keras_soma.schedules.WarmupCooldown` (a quadratic warm-up over the first
5% of the updates and a linear cool-down over the last 10%, the SM3
authors' advice), while `keras_soma.PolyakAveraging` keeps an exponential
moving average of the weights (decay 0.999, with `dynamic_decay` so that
the first weights are forgotten quickly). Then:

1. the raw weights are evaluated on the test set;
2. inside `averaging.averaged()`, the averaged weights are evaluated and
   exported as a TensorFlow SavedModel with `model.export(path)`;
3. the SavedModel is reloaded with `tf.saved_model.load` (no Keras model
   code needed) and serves predictions for the whole test set through its
   `serve` endpoint.

It prints raw against averaged test accuracy and writes
`sm3_polyak_serving.png` (the learning rate per step; test accuracy per
epoch of the raw and the averaged weights), `sm3_polyak_serving.md` and
`sm3_polyak_serving.csv` (test accuracy and loss of the raw weights, the
averaged weights, and the reloaded SavedModel) to `--output-dir`.

Run time on a 2-core laptop CPU: about 1-2 minutes for the full 5 epochs;
`--epochs 1 --steps-per-epoch 50` takes seconds (plus about 10 s to decode
the dataset once).

    python examples/sm3_polyak_serving.py
    python examples/sm3_polyak_serving.py --export-dir served_model
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fashion_mnist_common as common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_soma  # noqa: E402
from keras_soma.memory import state_bytes_per_parameter  # noqa: E402

EPOCHS = 5
BATCH_SIZE = 64
SEED = 0
OUTPUT_DIR = "results"
WARMUP_FRACTION = 0.05
COOLDOWN_FRACTION = 0.1
AVERAGING_DECAY = 0.999

COLUMNS = [
    ("weights", "weights", "{}"),
    ("served_from", "evaluated from", "{}"),
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("test_loss", "test loss", "{:.4f}"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="SM3's learning rate on the plateau of the schedule; "
        "default: SM3's default",
    )
    parser.add_argument(
        "--warmup-fraction",
        type=float,
        default=WARMUP_FRACTION,
        help=f"fraction of the updates spent warming up; default: {WARMUP_FRACTION}",
    )
    parser.add_argument(
        "--cooldown-fraction",
        type=float,
        default=COOLDOWN_FRACTION,
        help="fraction of the updates, at the end, spent cooling down to 0; "
        f"default: {COOLDOWN_FRACTION}",
    )
    parser.add_argument(
        "--averaging-decay",
        type=float,
        default=AVERAGING_DECAY,
        help=f"decay of PolyakAveraging's moving average; default: {AVERAGING_DECAY}",
    )
    parser.add_argument(
        "--export-dir",
        default=None,
        help="where to write the SavedModel of the averaged weights; "
        "default: a temporary directory, removed at the end",
    )
    common.add_common_arguments(parser, EPOCHS, BATCH_SIZE, SEED, OUTPUT_DIR)
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0; received {args.learning_rate}")
    for name in ("warmup_fraction", "cooldown_fraction"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            parser.error(
                f"--{name.replace('_', '-')} must lie in [0, 1]; received {value}"
            )
    if args.warmup_fraction + args.cooldown_fraction > 1.0:
        parser.error(
            "--warmup-fraction plus --cooldown-fraction must be at most 1; "
            f"received {args.warmup_fraction} + {args.cooldown_fraction}"
        )
    if not 0.0 < args.averaging_decay < 1.0:
        parser.error(
            f"--averaging-decay must lie in (0, 1); received {args.averaging_decay}"
        )
    if args.export_dir is not None and os.path.exists(args.export_dir):
        parser.error(f"--export-dir must not exist yet; received {args.export_dir!r}")
    return args


class RawWeightsTestAccuracy(keras.callbacks.Callback):
    """Test accuracy of the raw (not averaged) weights after every epoch.

    `fit`'s own validation runs on the averages (PolyakAveraging's
    `evaluate_with_average=True`); this callback's `evaluate` is called
    without PolyakAveraging, so it sees the raw weights.
    """

    def __init__(self, test):
        super().__init__()
        self.test = test
        self.accuracies = []

    def on_epoch_end(self, epoch, logs=None):
        results = self.model.evaluate(self.test, verbose=0, return_dict=True)
        self.accuracies.append(float(results["accuracy"]))
        print(
            f"epoch {epoch + 1}: test accuracy {self.accuracies[-1]:.4f} with "
            f"the raw weights, {logs['val_accuracy']:.4f} with the averages",
            flush=True,
        )


def serve(export_dir, test):
    """Reloads the SavedModel and serves the test set through its `serve`
    endpoint; returns the logits and the labels, as numpy arrays."""
    import tensorflow as tf

    served = tf.saved_model.load(export_dir)
    logits, labels = [], []
    for images, batch_labels in test:
        logits.append(served.serve(images).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def accuracy_and_loss(logits, labels):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == labels))
    return accuracy, float(keras.ops.convert_to_numpy(loss(labels, logits)))


def write_plot(path, title, learning_rates, raw_accuracies, averaged_accuracies):
    plt = common.pyplot()
    figure, (rate_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    rate_axes.plot(learning_rates, linewidth=1.2)
    rate_axes.set_xlabel("training step (batch)")
    rate_axes.set_ylabel("learning rate")
    rate_axes.set_title("WarmupCooldown schedule")
    rate_axes.grid(True, alpha=0.3)
    epochs = np.arange(1, len(raw_accuracies) + 1)
    accuracy_axes.plot(epochs, raw_accuracies, marker="o", label="raw weights")
    accuracy_axes.plot(epochs, averaged_accuracies, marker="s", label="Polyak average")
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("test accuracy")
    accuracy_axes.set_xticks(epochs)
    accuracy_axes.set_title("Test accuracy after each epoch")
    accuracy_axes.grid(True, alpha=0.3)
    accuracy_axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    make_train, test = common.load_data(args)
    keras.utils.set_random_seed(args.seed)
    train = make_train()
    steps_per_epoch = int(train.cardinality())
    if steps_per_epoch < 1:  # unknown to tf.data
        steps_per_epoch = math.ceil(common.TRAIN_EXAMPLES / args.batch_size)
    total_steps = args.epochs * steps_per_epoch

    keras.utils.set_random_seed(args.seed)
    model = common.build_mlp()
    peak_learning_rate = (
        args.learning_rate
        if args.learning_rate is not None
        else keras_soma.SM3().get_config()["learning_rate"]
    )
    schedule = keras_soma.schedules.WarmupCooldown(
        learning_rate=peak_learning_rate,
        warmup_steps=int(args.warmup_fraction * total_steps),
        total_steps=total_steps,
        cooldown_steps=int(args.cooldown_fraction * total_steps),
    )
    model.compile(
        optimizer=keras_soma.SM3(learning_rate=schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    averaging = keras_soma.PolyakAveraging(
        decay=args.averaging_decay, dynamic_decay=True
    )
    raw_accuracy = RawWeightsTestAccuracy(test)
    history = model.fit(
        train,
        epochs=args.epochs,
        validation_data=test,  # evaluated on the averages
        callbacks=[averaging, raw_accuracy],
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=2,
    )

    raw = model.evaluate(test, verbose=0, return_dict=True)
    export_dir = args.export_dir or os.path.join(
        tempfile.mkdtemp(prefix="sm3_polyak_"), "model"
    )
    with averaging.averaged():
        averaged = model.evaluate(test, verbose=0, return_dict=True)
        averaged_logits = model.predict(test, verbose=0)
        model.export(export_dir, verbose=False)
    served_logits, labels = serve(export_dir, test)
    served_accuracy, served_loss = accuracy_and_loss(served_logits, labels)
    largest_difference = float(np.max(np.abs(served_logits - averaged_logits)))
    if args.export_dir is None:
        shutil.rmtree(os.path.dirname(export_dir))

    optimizer_bytes = state_bytes_per_parameter(
        model.optimizer, model.trainable_variables
    )
    parameters = sum(int(np.prod(weight.shape)) for weight in model.trainable_variables)
    averaging_bytes = (
        sum(
            int(np.prod(average.shape)) * np.dtype(average.dtype).itemsize
            for average in averaging.averages
        )
        / parameters
    )
    rows = [
        {
            "weights": "raw",
            "served_from": "Keras model in memory",
            "test_accuracy": float(raw["accuracy"]),
            "test_loss": float(raw["loss"]),
        },
        {
            "weights": "Polyak average",
            "served_from": "Keras model in memory, inside averaged()",
            "test_accuracy": float(averaged["accuracy"]),
            "test_loss": float(averaged["loss"]),
        },
        {
            "weights": "Polyak average",
            "served_from": "reloaded SavedModel, serve endpoint",
            "test_accuracy": served_accuracy,
            "test_loss": served_loss,
        },
    ]
    title = (
        f"SM3 + WarmupCooldown + PolyakAveraging, fashion-MNIST MLP, batch "
        f"{args.batch_size}, {common.epochs_text(args.epochs)}"
    )
    summary = (
        f"SM3 state {optimizer_bytes:.2f} bytes/param, Polyak averages "
        f"{averaging_bytes:.2f} bytes/param; largest difference between the "
        f"served and the in-memory averaged logits: {largest_difference:.2g}."
    )
    paths = common.output_paths(args.output_dir, "sm3_polyak_serving")
    learning_rates = keras.ops.convert_to_numpy(schedule(keras.ops.arange(total_steps)))
    write_plot(
        paths["png"],
        title,
        learning_rates,
        raw_accuracy.accuracies,
        history.history["val_accuracy"],
    )
    common.write_tables(
        rows,
        paths,
        f"{title}\n\n{summary}",
        common.command_line("examples/sm3_polyak_serving.py", argv),
        COLUMNS,
    )
    print(
        f"\nTest accuracy: raw weights {rows[0]['test_accuracy']:.4f}, "
        f"Polyak average {rows[1]['test_accuracy']:.4f}, "
        f"served SavedModel {rows[2]['test_accuracy']:.4f}"
    )
    print(summary)
    common.report(rows, paths, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
