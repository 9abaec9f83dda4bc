"""The start shared by the worker scripts that tests run as processes of a
multi-process JAX run (`distributed_processes.py`,
`majority_vote_processes.py`, `vote_resume_processes.py`).

Imports nothing of JAX or Keras at import time: `join_processes` sets
what they read when they start.
"""

from __future__ import annotations

import faulthandler
import os
import sys

TESTS_DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def join_processes(
    index: int,
    port,
    processes: int,
    devices_per_process: int,
    timeout_seconds: float,
    heartbeat_seconds: int | None = None,
) -> None:
    """Starts this process as process `index` of `processes`, each with
    `devices_per_process` host devices, joined through a coordinator on
    127.0.0.1:`port`.

    Before JAX or Keras is imported: a watchdog that dumps every thread's
    stack and ends the process after `timeout_seconds` whatever it is doing
    (a peer gone), the tests and benchmarks folders on `sys.path`, the JAX
    backend with its host devices, and CPU collectives through gloo. Then
    `keras.distribution.initialize`; with `heartbeat_seconds`,
    `jax.distributed.initialize` instead (what Keras calls), with that
    heartbeat timeout in place of JAX's default 100 s, so that the
    survivors of a dead process learn of it sooner.
    """
    faulthandler.dump_traceback_later(timeout_seconds, exit=True)
    for folder in (TESTS_DIRECTORY, os.path.join(TESTS_DIRECTORY, "..", "benchmarks")):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    from vote_traffic import host_device_flags

    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["XLA_FLAGS"] = host_device_flags(devices_per_process)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = f"127.0.0.1:{port}"
    if heartbeat_seconds is None:
        import keras

        keras.distribution.initialize(
            job_addresses=address, num_processes=processes, process_id=index
        )
    else:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=processes,
            process_id=index,
            heartbeat_timeout_seconds=heartbeat_seconds,
        )


def local_part(values, index: int, processes: int, local_batch: int):
    """Process `index`'s part of every global batch of `values` (a numpy
    array of whole global batches of `processes * local_batch` rows): Keras
    makes each global batch of the processes' batches, in process order."""
    steps = len(values) // (processes * local_batch)
    values = values[: steps * processes * local_batch]
    values = values.reshape(steps, processes, local_batch, -1)[:, index]
    return values.reshape(steps * local_batch, -1)
