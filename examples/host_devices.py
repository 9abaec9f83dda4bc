"""XLA_FLAGS for several JAX devices on one CPU ("host devices").

Imports neither JAX nor Keras: set the flags before JAX starts its CPU
backend (its first device query), e.g.

    os.environ["XLA_FLAGS"] = host_device_flags(4)
"""

from __future__ import annotations


def host_device_flags(count: int) -> str:
    """XLA_FLAGS for `count` host (CPU) devices.

    XLA's CPU collectives abort the process when a device's thread is more
    than 40 s late at a rendezvous, which happens on a loaded machine (the
    devices are threads sharing its cores); the limits are raised.
    """
    if count < 1:
        raise ValueError(f"`count` must be an integer >= 1; received: count={count}")
    return (
        f"--xla_force_host_platform_device_count={count} "
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=1200 "
        "--xla_cpu_collective_timeout_seconds=1200"
    )
