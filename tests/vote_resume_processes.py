"""One of two processes (2 host devices each) training majority-vote Soma
with `BackupAndRestore`, started by `test_distribute.py`:

    python tests/vote_resume_processes.py PROCESS_INDEX PORT DIRECTORY [KILL_STEP]

`jax.distributed.initialize` joins the processes, as
`keras.distribution.initialize` does but with a heartbeat of
`HEARTBEAT_SECONDS` (the coordinator on 127.0.0.1:PORT, CPU collectives
through gloo). The model trains `EPOCHS`
epochs of `STEPS_PER_EPOCH` steps, each process feeding its half of every
global batch, with a backup (this process's own folder in DIRECTORY) at
the end of every epoch. With KILL_STEP, process 1 sends itself SIGKILL
after that many steps (counted over the epochs), as a machine that dies
would. Otherwise, after training, process 0 writes the weights and every
worker's momentum, gathered from both processes, and the number of steps
this run trained to DIRECTORY/final.npz.
A watchdog ends the process after `TIMEOUT_SECONDS` whatever it is doing.
"""

from __future__ import annotations

import os
import signal
import sys

PROCESSES = 2
DEVICES_PER_PROCESS = 2
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 4
EPOCHS = 3
TIMEOUT_SECONDS = 240
HEARTBEAT_SECONDS = 10


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    index, port, directory = int(argv[0]), argv[1], argv[2]
    kill_step = int(argv[3]) if len(argv) > 3 else None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from worker_setup import join_processes, local_part

    join_processes(
        index,
        port,
        PROCESSES,
        DEVICES_PER_PROCESS,
        TIMEOUT_SECONDS,
        heartbeat_seconds=HEARTBEAT_SECONDS,
    )
    import keras
    import numpy as np
    from helpers import regression_data
    from jax.experimental import multihost_utils

    import keras_soma

    inputs, targets = regression_data(samples=GLOBAL_BATCH * STEPS_PER_EPOCH)
    local_batch = GLOBAL_BATCH // PROCESSES

    class CountOrDie(keras.callbacks.Callback):
        """Counts the steps this run trains; SIGKILL to this process after
        `kill_step` of them, where given."""

        def __init__(self, kill_step):
            super().__init__()
            self.steps = 0
            self.kill_step = kill_step

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if self.steps == self.kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

    counter = CountOrDie(kill_step if index == 1 else None)
    callbacks = [
        keras.callbacks.BackupAndRestore(
            os.path.join(directory, f"backup_{index}"), double_checkpoint=True
        ),
        counter,
    ]
    distribution = keras.distribution.DataParallel(auto_shard_dataset=False)
    with distribution.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        model.compile(
            optimizer=keras_soma.Soma(learning_rate=1e-2, momentum=0.5), loss="mse"
        )
        keras_soma.distribute.majority_vote(model)
        model.fit(
            local_part(inputs, index, PROCESSES, local_batch),
            local_part(targets, index, PROCESSES, local_batch),
            batch_size=local_batch,
            epochs=EPOCHS,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )

    def gathered(variable):
        return np.asarray(multihost_utils.process_allgather(variable.value, tiled=True))

    values = {
        f"weight_{number}": gathered(variable)
        for number, variable in enumerate(model.trainable_variables)
    }
    values.update(
        {
            f"state_{number}": gathered(variable)
            for number, variable in enumerate(model.optimizer.variables)
        }
    )
    if index == 0:
        np.savez(
            os.path.join(directory, "final.npz"), steps_run=counter.steps, **values
        )


if __name__ == "__main__":
    main()
