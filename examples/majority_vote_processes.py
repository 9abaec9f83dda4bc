"""Majority-vote Soma across processes: two processes on one machine.

What it shows: `keras.distribution.initialize` joining processes as one
would on several hosts, a `DataParallel` distribution over every device of
every process, and `keras_soma.distribute.majority_vote`, so that only the
packed signs of the workers' momenta cross between processes. Each process
here has two host (CPU) devices, so four workers vote.

Run time: about a minute on two CPU cores. Start both processes (on
several hosts: the first host's address instead of 127.0.0.1, and each
host's own --process):

    KERAS_BACKEND=jax python examples/majority_vote_processes.py --process 0 &
    KERAS_BACKEND=jax python examples/majority_vote_processes.py --process 1
    wait

The data is synthetic (a random linear teacher's labels); each process
feeds its own half of every global batch. Process 0 prints the accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys

PROCESSES = 2
DEVICES_PER_PROCESS = 2
COORDINATOR = "127.0.0.1:12355"
EPOCHS = 2
GLOBAL_BATCH_SIZE = 64
SAMPLES = 4096
FEATURES = 32
CLASSES = 4


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process", type=int, required=True)
    parser.add_argument("--processes", type=int, default=PROCESSES)
    parser.add_argument("--devices-per-process", type=int, default=DEVICES_PER_PROCESS)
    parser.add_argument("--coordinator", default=COORDINATOR)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    if not 0 <= args.process < args.processes:
        parser.error(
            f"--process must be in [0, {args.processes}); received {args.process}"
        )
    if GLOBAL_BATCH_SIZE % (args.processes * args.devices_per_process):
        parser.error("the global batch must split evenly over the devices")
    return args


def synthetic_data(seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((SAMPLES, FEATURES)).astype("float32")
    teacher = rng.standard_normal((FEATURES, CLASSES))
    labels = np.argmax(inputs @ teacher, axis=1).astype("int32")
    return inputs, labels


def main(argv=None):
    args = parse_arguments(argv)
    # Host devices for this process; real accelerators need no flag.
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.devices_per_process}"
    )
    import jax

    # Collectives between CPU processes go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    import keras_soma

    if keras.backend.backend() != "jax":
        sys.exit("run with KERAS_BACKEND=jax")
    keras.distribution.initialize(
        job_addresses=args.coordinator,
        num_processes=args.processes,
        process_id=args.process,
    )
    inputs, labels = synthetic_data()
    # This process's half of every global batch (Keras joins the processes'
    # batches, in process order, into the global one).
    local_batch = GLOBAL_BATCH_SIZE // args.processes
    steps = SAMPLES // GLOBAL_BATCH_SIZE

    def local_part(values):
        values = values[: steps * GLOBAL_BATCH_SIZE]
        values = values.reshape(steps, args.processes, local_batch, *values.shape[1:])
        return values[:, args.process].reshape(-1, *values.shape[3:])

    # Every device of every process; the data is already split above.
    distribution = keras.distribution.DataParallel(auto_shard_dataset=False)
    with distribution.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(CLASSES),
            ]
        )
        model.compile(
            optimizer=keras_soma.Soma(learning_rate=1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        keras_soma.distribute.majority_vote(model)
        history = model.fit(
            local_part(inputs),
            local_part(labels),
            batch_size=local_batch,
            epochs=args.epochs,
            shuffle=False,
            verbose=0,
        )
    if args.process == 0:
        print(
            f"{args.processes} processes x {args.devices_per_process} devices = "
            f"{len(jax.devices())} workers; final epoch: loss "
            f"{history.history['loss'][-1]:.4f}, accuracy "
            f"{history.history['accuracy'][-1]:.4f}"
        )


if __name__ == "__main__":
    main()
