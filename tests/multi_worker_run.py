"""One worker of a two-process MultiWorkerMirroredStrategy run on localhost,
started by `test_distribution.py` (twice, with worker indices 0 and 1).

    python tests/multi_worker_run.py WORKER_INDEX PORT_0,PORT_1 OUTPUT.npz \
        [--steps 200] [--timeout 115]

Trains the fashion-MNIST MLP (784-128-64-10) with every optimizer of
`registry.REGISTRY` in turn, each with `PolyakAveraging`: with its
defaults for `--steps` steps, and, where its registry `config_case` keeps
state of other dtypes, with that for a few more. The loop is a custom one
(Keras 3's `fit` does not run under this strategy: keras-team/keras#20585).
The data is fashion-MNIST when it lies at `TFDS_DATA_DIR`, else synthetic
data of its shape. The global batch is split between the workers
(`AutoShardPolicy.DATA`), so each worker computes the gradient of its half
and the strategy all-reduces them. Each worker writes its final weights,
optimizer state and averages to OUTPUT.npz; the test compares the two
files.

The run stops by itself: a watchdog ends the process after `--timeout`
seconds whatever it is doing, and collective operations give up after the
same time instead of waiting for a peer that has gone.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

GLOBAL_BATCH_SIZE = 64
STEPS = 200
CONFIG_CASE_STEPS = 20
TIMEOUT_SECONDS = 115
SAMPLES = GLOBAL_BATCH_SIZE * 50  # the data repeats every 50 steps


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("worker_index", type=int, choices=(0, 1))
    parser.add_argument("ports", help="two comma-separated ports on 127.0.0.1")
    parser.add_argument("output", help="the .npz file to write")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS)
    return parser.parse_args(argv)


def load_data(tf):
    """`(images, labels, source)`: fashion-MNIST from TFDS_DATA_DIR, or
    synthetic data of its shape whose labels a linear model can learn."""
    import numpy as np

    data_dir = os.environ.get("TFDS_DATA_DIR", "")
    if data_dir and os.path.isdir(os.path.join(data_dir, "fashion_mnist")):
        import tensorflow_datasets as tfds

        dataset = tfds.load(
            "fashion_mnist",
            split=f"train[:{SAMPLES}]",
            data_dir=data_dir,
            download=False,
            as_supervised=True,
            batch_size=-1,
        )
        images, labels = tfds.as_numpy(dataset)
        images = images.reshape(SAMPLES, 784).astype("float32") / 255.0
        return images, labels.astype("int32"), "fashion_mnist"
    rng = np.random.default_rng(0)
    images = rng.random((SAMPLES, 784)).astype("float32")
    teacher = rng.standard_normal((784, 10)).astype("float32")
    labels = np.argmax(images @ teacher, axis=1).astype("int32")
    return images, labels, "synthetic"


def loss_on(model, images, labels, samples=512):
    """The mean cross-entropy of this worker's copy of the model on the
    first `samples` examples (computed locally, outside the strategy)."""
    import keras
    import numpy as np

    logits = model(images[:samples], training=False)
    losses = keras.losses.sparse_categorical_crossentropy(
        labels[:samples], logits, from_logits=True
    )
    return np.array(float(keras.ops.mean(losses)))


def train(strategy, model, dataset, steps, averaging):
    """`steps` steps of a custom training loop (Keras 3's `fit` does not
    run under MultiWorkerMirroredStrategy: keras-team/keras#20585), with
    `averaging` driven as `fit` drives it."""
    import keras
    import tensorflow as tf

    optimizer = model.optimizer

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            losses = keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True
            )
            loss = tf.nn.compute_average_loss(
                losses, global_batch_size=GLOBAL_BATCH_SIZE
            )
        gradients = tape.gradient(loss, model.trainable_variables)
        # Keras sums the gradients over all replicas of all workers.
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    @tf.function
    def step(iterator):
        losses = strategy.run(replica_step, args=next(iterator))
        return strategy.reduce("SUM", losses, axis=None)

    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    averaging.set_model(model)
    averaging.on_train_begin()
    for batch in range(steps):
        step(iterator)
        averaging.on_train_batch_end(batch)
    averaging.on_train_end()


def state_dtypes(optimizer_class, optimizer_arguments):
    """The dtypes of the state an optimizer keeps (built outside the
    strategy, on one small variable)."""
    import keras
    import numpy as np

    optimizer = optimizer_class(**optimizer_arguments)
    optimizer.build([keras.Variable(np.zeros((2, 2), "float32"))])
    return {str(variable.dtype) for variable in optimizer.variables}


def main(argv=None):
    arguments = parse_arguments(argv)
    # The watchdog: whatever happens below, the process ends (printing
    # where it was) after the timeout.
    faulthandler.dump_traceback_later(arguments.timeout, exit=True)
    ports = arguments.ports.split(",")
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": arguments.worker_index},
        }
    )
    import tensorflow as tf

    # The strategy must exist before any other TensorFlow operation runs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=arguments.timeout
        )
    )
    import keras
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from registry import REGISTRY

    import keras_soma

    images, labels, source = load_data(tf)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .batch(GLOBAL_BATCH_SIZE, drop_remainder=True)
        .repeat()
        .with_options(options)
    )
    results = {"data_source": np.array(source)}
    # Each optimizer with its defaults (tuned on fashion-MNIST) for the
    # full run, and with its registry `config_case` for a short one where
    # that keeps state of other dtypes.
    runs = []
    for name, spec in REGISTRY.items():
        runs.append((name, spec.cls, {}, arguments.steps))
        if state_dtypes(spec.cls, spec.config_case) != state_dtypes(spec.cls, {}):
            runs.append(
                (f"{name}-config_case", spec.cls, spec.config_case, CONFIG_CASE_STEPS)
            )
    for run_name, optimizer_class, optimizer_arguments, steps in runs:
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = keras.Sequential(
                [
                    keras.Input((784,)),
                    keras.layers.Dense(128, activation="relu"),
                    keras.layers.Dense(64, activation="relu"),
                    keras.layers.Dense(10),
                ]
            )
            model.compile(optimizer=optimizer_class(**optimizer_arguments))
        results[f"{run_name}/initial_loss"] = loss_on(model, images, labels)
        averaging = keras_soma.PolyakAveraging(decay=0.99)
        train(strategy, model, dataset, steps, averaging)
        results[f"{run_name}/final_loss"] = loss_on(model, images, labels)
        for index, weight in enumerate(model.trainable_variables):
            results[f"{run_name}/weight/{index}"] = keras.ops.convert_to_numpy(weight)
        for variable in model.optimizer.variables:
            results[f"{run_name}/optimizer/{variable.path}"] = (
                keras.ops.convert_to_numpy(variable)
            )
        for index, average in enumerate(averaging.averages):
            results[f"{run_name}/average/{index}"] = keras.ops.convert_to_numpy(average)
    np.savez(arguments.output, **results)
    sys.stdout.flush()
    # Leave without waiting for the collective runtime's threads, which can
    # keep a finished worker alive for minutes.
    os._exit(0)


if __name__ == "__main__":
    main()
