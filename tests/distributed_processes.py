"""One of two processes (2 host devices each) training every optimizer of
`registry.REGISTRY` over all four devices, started by
`test_distribution.py`:

    python tests/distributed_processes.py PROCESS_INDEX PORT OUTPUT

`keras.distribution.initialize` joins the processes (the coordinator on
127.0.0.1:PORT, CPU collectives through gloo), as on two hosts. Each case
of `CASES` is trained with `fit` under `DataParallel` over the four
devices and under `ModelParallel` on a 2 x 2 mesh ("batch" across the
processes, "model" within each, `helpers.MODEL_PARALLEL_LAYOUTS`), each
process feeding its half of every global batch. Every weight and every
optimizer variable is then gathered from both processes; process 0 writes
them to OUTPUT, process 1 to OUTPUT.process1.npz. A watchdog ends the
process after `TIMEOUT_SECONDS` whatever it is doing (a peer gone).
"""

from __future__ import annotations

import json
import os
import sys

PROCESSES = 2
DEVICES_PER_PROCESS = 2
GLOBAL_BATCH = 16
EPOCHS = 2
TIMEOUT_SECONDS = 420
KINDS = ("data_parallel", "model_parallel")


def cases():
    """(name, optimizer class, arguments): every registry optimizer with
    its defaults and its config case, and the int8 momenta."""
    from registry import REGISTRY

    import keras_soma

    found = []
    for name, spec in REGISTRY.items():
        for label, arguments in (("defaults", {}), ("config_case", spec.config_case)):
            arguments = {"learning_rate": spec.fit_learning_rate, **arguments}
            found.append((f"{name}-{label}", spec.cls, arguments))
    for cls in (keras_soma.Soma, keras_soma.SM3):
        rate = REGISTRY[cls.__name__].fit_learning_rate
        found.append(
            (
                f"{cls.__name__}-int8",
                cls,
                {"learning_rate": rate, "momentum_dtype": "int8", "block_size": 4},
            )
        )
    return found


def key(case_name, kind):
    return f"{case_name}/{kind}"


def main(argv=None):
    index, port, output = (argv or sys.argv[1:])[:3]
    index = int(index)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from worker_setup import join_processes, local_part

    join_processes(index, port, PROCESSES, DEVICES_PER_PROCESS, TIMEOUT_SECONDS)
    import keras
    import numpy as np
    from helpers import distribution_over, jax_model, regression_data
    from jax.experimental import multihost_utils

    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == PROCESSES * DEVICES_PER_PROCESS, devices
    inputs, targets = regression_data(outputs=4)
    local_batch = GLOBAL_BATCH // PROCESSES

    def gathered(variable):
        return np.asarray(multihost_utils.process_allgather(variable.value, tiled=True))

    results = {}
    for case_name, cls, arguments in cases():
        for kind in KINDS:
            distribution = distribution_over(
                kind, devices, batch_groups=PROCESSES, auto_shard_dataset=False
            )
            with distribution.scope():
                model = jax_model()
                model.compile(optimizer=cls(**arguments), loss="mse")
                model.fit(
                    local_part(inputs, index, PROCESSES, local_batch),
                    local_part(targets, index, PROCESSES, local_batch),
                    batch_size=local_batch,
                    epochs=EPOCHS,
                    shuffle=False,
                    verbose=0,
                )
            for number, variable in enumerate(model.trainable_variables):
                results[f"{key(case_name, kind)}/weight/{number}"] = gathered(variable)
            for number, variable in enumerate(model.optimizer.variables):
                results[f"{key(case_name, kind)}/state/{number}"] = gathered(variable)
            if index == 0:
                print(f"{case_name} {kind}: trained", flush=True)
    target = output if index == 0 else f"{output}.process{index}.npz"
    # np.load cannot read bfloat16 back: stored as float32 (exact), with
    # every array's dtype beside it.
    dtypes = {name: str(value.dtype) for name, value in results.items()}
    np.savez(
        target,
        dtypes=np.asarray(json.dumps(dtypes)),
        **{
            name: value.astype(np.float32) if dtypes[name] == "bfloat16" else value
            for name, value in results.items()
        },
    )


if __name__ == "__main__":
    main()
