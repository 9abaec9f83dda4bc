"""Majority-vote Soma over N host devices, started by `test_distribute.py`
in a process of its own (XLA reads the device count when JAX starts).

    python tests/majority_vote_run.py OUTPUT_DIRECTORY CASE [CASE ...]

where each CASE is `WORKERS,EXCHANGE,WEIGHT_DECAY,NAN_STEP[,schedule]`
(`none` for no weight decay; NAN_STEP `none`, or the step at which the
first worker's shard holds a NaN, which turns `skip_nonfinite` on;
`schedule`: the learning rate is `learning_rate(step)` below instead of
`LEARNING_RATE`), e.g. `4,packed,0.1,none`.

Trains a linear model (`Dense`, mean squared error, whose per-worker
gradients the test computes in numpy) with `fit` under
`DataParallel(devices=first WORKERS host devices)` and
`keras_soma.distribute.majority_vote`, one batch of `GLOBAL_BATCH` per
step, and writes the data, the initial weights, the weights after every
step and the final per-worker momenta to OUTPUT_DIRECTORY/CASE.npz.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Only as a script: test_distribute.py imports this module for its
    # constants, and its process (and every subprocess it starts, which
    # inherit its environment) keeps the backend the suite runs on.
    os.environ["KERAS_BACKEND"] = "jax"
    # Set by the test (with longer collective timeouts), else 4 host devices.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GLOBAL_BATCH = 24  # divisible by 2, 3 and 4 workers
FEATURES = 6
OUTPUTS = 3
LEARNING_RATE = 0.05
MOMENTUM = 0.5


STEPS = 12
DECAY_RATE = 0.25  # of the InverseTimeDecay schedule of `schedule` cases


def learning_rate(step, schedule):
    """The learning rate of a step (counted from 0), in float32, as Keras's
    `InverseTimeDecay(LEARNING_RATE, decay_steps=1, decay_rate=DECAY_RATE)`
    computes it."""
    import numpy as np

    if not schedule:
        return np.float32(LEARNING_RATE)
    return np.float32(LEARNING_RATE) / (
        np.float32(1.0) + np.float32(DECAY_RATE) * np.float32(step)
    )


def parse_case(case):
    workers, exchange, weight_decay, nan_step, *options = case.split(",")
    return {
        "workers": int(workers),
        "exchange": exchange,
        "weight_decay": None if weight_decay == "none" else float(weight_decay),
        "nan_step": None if nan_step == "none" else int(nan_step),
        "schedule": options == ["schedule"],
    }


def data(steps, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((steps * GLOBAL_BATCH, FEATURES)).astype("float32")
    teacher = rng.standard_normal((FEATURES, OUTPUTS))
    noise = rng.standard_normal((steps * GLOBAL_BATCH, OUTPUTS))
    targets = (inputs @ teacher + noise).astype("float32")
    return inputs, targets


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    for case in argv[1:]:
        run_case(os.path.join(argv[0], f"{case}.npz"), **parse_case(case))


def run_case(output, workers, exchange, weight_decay, nan_step, schedule, process=None):
    """Trains one case and writes OUTPUT. With `process=(index, count)`
    (a multi-process run, after `keras.distribution.initialize`), this
    process feeds its part of every global batch, the model is not saved,
    and the momenta are gathered from every process."""
    import keras
    import numpy as np

    import keras_soma

    inputs, targets = data(STEPS)
    if nan_step is not None:
        inputs[nan_step * GLOBAL_BATCH, 0] = np.nan
    skip_nonfinite = nan_step is not None
    fed_inputs, fed_targets, batch_size = inputs, targets, GLOBAL_BATCH
    if process is not None:
        # Keras makes each global batch of the processes' batches, in
        # process order.
        from worker_setup import local_part

        index, count = process
        batch_size = GLOBAL_BATCH // count
        fed_inputs, fed_targets = (
            local_part(values, index, count, batch_size) for values in (inputs, targets)
        )
    devices = keras.distribution.list_devices("cpu")[:workers]
    # Each process feeds its own part (below), already sharded.
    distribution = keras.distribution.DataParallel(
        devices=devices, auto_shard_dataset=process is None
    )
    weights_after_step = []

    class RecordWeights(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            weights_after_step.append([np.asarray(v) for v in self.model.get_weights()])

    def make_model():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((FEATURES,)), keras.layers.Dense(OUTPUTS)]
        )
        model.compile(
            optimizer=keras_soma.Soma(
                learning_rate=keras.optimizers.schedules.InverseTimeDecay(
                    LEARNING_RATE, decay_steps=1, decay_rate=DECAY_RATE
                )
                if schedule
                else LEARNING_RATE,
                momentum=MOMENTUM,
                weight_decay=weight_decay,
                skip_nonfinite=skip_nonfinite,
            ),
            loss="mse",
        )
        return keras_soma.distribute.majority_vote(model, exchange=exchange)

    with distribution.scope():
        model = make_model()
        initial = [np.asarray(v) for v in model.get_weights()]
        history = model.fit(
            fed_inputs,
            fed_targets,
            batch_size=batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[RecordWeights()],
        )
        restored = model
        if process is None:
            # A checkpoint: the same model made again (majority_vote before
            # the optimizer is built) loads every worker's momentum.
            checkpoint = os.path.splitext(output)[0] + ".keras"
            model.save(checkpoint)
            restored = make_model()
            restored.optimizer.build(restored.trainable_variables)
            restored.load_weights(checkpoint)
    optimizer = model.optimizer

    def gathered(variable):
        if process is None:
            return keras.ops.convert_to_numpy(variable)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(variable.value, tiled=True))

    restored_momenta = [
        gathered(restored.optimizer.get_slots(v)["momentum"])
        for v in restored.trainable_variables
    ]
    momenta = [
        gathered(optimizer.get_slots(v)["momentum"]) for v in model.trainable_variables
    ]
    shardings = [
        str(optimizer.get_slots(v)["momentum"].value.sharding.spec)
        for v in model.trainable_variables
    ]
    np.savez(
        output,
        inputs=inputs,
        targets=targets,
        kernel_0=initial[0],
        bias_0=initial[1],
        kernels=np.stack([w[0] for w in weights_after_step]),
        biases=np.stack([w[1] for w in weights_after_step]),
        kernel_momenta=momenta[0],
        bias_momenta=momenta[1],
        restored_kernel_momenta=restored_momenta[0],
        restored_bias_momenta=restored_momenta[1],
        restored_iterations=int(
            keras.ops.convert_to_numpy(restored.optimizer.iterations)
        ),
        iterations=int(keras.ops.convert_to_numpy(optimizer.iterations)),
        skipped=int(keras.ops.convert_to_numpy(optimizer.skipped_steps))
        if skip_nonfinite
        else -1,
        loss=np.asarray(history.history["loss"]),
        shardings=np.asarray(shardings),
    )


if __name__ == "__main__":
    main()
