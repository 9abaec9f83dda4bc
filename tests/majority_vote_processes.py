"""One of two processes (2 host devices each) training majority-vote Soma
over all four devices, started by `test_distribute.py`:

    python tests/majority_vote_processes.py PROCESS_INDEX PORT OUTPUT CASE

`keras.distribution.initialize` joins the processes (the coordinator on
127.0.0.1:PORT, CPU collectives through gloo); then the CASE of
`majority_vote_run.py` is trained with each process feeding its half of
every global batch, and process 0 writes OUTPUT. A watchdog ends the
process after `TIMEOUT_SECONDS` whatever it is doing.
"""

from __future__ import annotations

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_SECONDS = 240


def main(argv=None):
    index, port, output, case = (argv or sys.argv[1:])[:4]
    index = int(index)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from worker_setup import join_processes

    join_processes(index, port, PROCESSES, DEVICES_PER_PROCESS, TIMEOUT_SECONDS)
    import majority_vote_run as run

    arguments = run.parse_case(case)
    assert arguments["workers"] == PROCESSES * DEVICES_PER_PROCESS, case
    target = output if index == 0 else output + f".process{index}.npz"
    run.run_case(target, **arguments, process=(index, PROCESSES))


if __name__ == "__main__":
    main()
