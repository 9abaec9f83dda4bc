"""A small deterministic training run, used by the fault-tolerance tests
both in-process and as a subprocess that gets killed.

    python tests/training_run.py OPTIMIZER BACKUP_DIR OUTPUT.npz [--crash-at-step N]

Trains a tiny model for `EPOCHS` epochs on fixed data with
`keras.callbacks.BackupAndRestore(save_freq="epoch", double_checkpoint=True)`
and
`keras_soma.PolyakAveraging`, printing "step <n>" after every batch, and
saves the final weights, optimizer state and averages to OUTPUT.npz.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from registry import REGISTRY  # noqa: E402

import keras_soma  # noqa: E402

EPOCHS = 3
BATCH_SIZE = 16
SAMPLES = 128  # 8 steps per epoch


class CrashAt(keras.callbacks.Callback):
    """Raises after the given global step, as a crash would."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise RuntimeError(f"injected crash after step {self.step}")


class PrintSteps(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        print(f"step {self.seen}", flush=True)


def data():
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((SAMPLES, 8)).astype("float32")
    targets = (inputs @ rng.standard_normal((8, 1)) + 0.1).astype("float32")
    return inputs, targets


def build(optimizer_name: str) -> keras.Model:
    spec = REGISTRY[optimizer_name]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=spec.cls(learning_rate=spec.fit_learning_rate), loss="mse")
    return model


def train(optimizer_name: str, backup_dir=None, extra_callbacks=(), model=None):
    """Trains (resuming from `backup_dir` if it holds a backup), keeping
    Polyak averages of the weights (their state is saved with the model's
    weights, so the backup carries it)."""
    model = model or build(optimizer_name)
    averaging = keras_soma.PolyakAveraging(decay=0.9, evaluate_with_average=False)
    model.polyak_averaging_callback = averaging
    callbacks = [averaging, *extra_callbacks]
    if backup_dir is not None:
        # double_checkpoint: a kill while the backup is being written leaves
        # a truncated weights file, which Keras cannot open on restart
        # ("file signature not found"); with the previous backup kept,
        # Keras restores that one instead.
        callbacks.insert(
            0,
            keras.callbacks.BackupAndRestore(
                backup_dir, save_freq="epoch", double_checkpoint=True
            ),
        )
    inputs, targets = data()
    model.fit(
        inputs,
        targets,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        shuffle=False,
        callbacks=callbacks,
        verbose=0,
    )
    return model


def final_state(model) -> dict:
    arrays = {
        f"weight_{i}": keras.ops.convert_to_numpy(w)
        for i, w in enumerate(model.weights)
    }
    for i, variable in enumerate(model.optimizer.variables):
        arrays[f"optimizer_{i}"] = keras.ops.convert_to_numpy(variable)
    averaging = getattr(model, "polyak_averaging_callback", None)
    if averaging is not None:
        for i, average in enumerate(averaging.averages):
            arrays[f"average_{i}"] = keras.ops.convert_to_numpy(average)
        arrays["average_updates"] = np.asarray(averaging.num_updates)
        arrays["average_last_step"] = np.asarray(averaging.last_step)
    return arrays


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("optimizer")
    parser.add_argument("backup_dir")
    parser.add_argument("output")
    parser.add_argument("--crash-at-step", type=int, default=None)
    args = parser.parse_args()
    callbacks = [PrintSteps()]
    if args.crash_at_step:
        callbacks.append(CrashAt(args.crash_at_step))
    model = train(args.optimizer, args.backup_dir, callbacks)
    np.savez(args.output, **final_state(model))
    print("done", flush=True)


if __name__ == "__main__":
    main()
