"""GradSign's step under torch.compile: int8 or int32 counter arithmetic.

Times one 2048 x 2048 float32 step of `gradsign_update` compiled by
torch.compile (Inductor, CPU), with the counter's arithmetic worked in
int8 (as XLA gets it) and in int32 (what `gradsign_update` does on torch),
and Soma's step for comparison: Inductor's CPU code does int8 shifts and
products lane by lane (see docs/performance.md). Medians of a few calls,
one intra-op thread (see `step_speed.py --threads`).

    KERAS_BACKEND=torch python benchmarks/gradsign_compile_torch.py
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
from keras import ops  # noqa: E402

from keras_soma import _common  # noqa: E402
from keras_soma.soma import soma_update  # noqa: E402


def gradsign_step(work):
    """GradSign's step with the counter worked in `work` (int8 or int32)."""

    def step(value, gradient, counter, learning_rate):
        count = ops.cast(counter, work)
        count = ops.subtract(count, ops.right_shift(ops.add(count, 4), 3))
        count = ops.add(count, ops.multiply(_common.nan_safe_sign(gradient, work), 8))
        averaged_sign = ops.divide(ops.cast(count, value.dtype), 64)
        return (
            ops.subtract(value, ops.multiply(learning_rate, averaged_sign)),
            ops.cast(count, "int8"),
        )

    return step


def main():
    if keras.backend.backend() != "torch":
        raise SystemExit("run with KERAS_BACKEND=torch")
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = (2048, 2048)
    value, gradient = torch.randn(shape), torch.randn(shape)
    counter = torch.zeros(shape, dtype=torch.int8)
    average = torch.randn(shape)
    learning_rate = torch.tensor(2e-4)
    cases = [
        ("GradSign, counter in int8", gradsign_step("int8"), counter),
        ("GradSign, counter in int32", gradsign_step("int32"), counter),
        (
            "Soma",
            lambda v, g, m, lr: soma_update(v, g, m, lr, 0.95),
            average,
        ),
    ]
    print(
        "Produced by `KERAS_BACKEND=torch python benchmarks/gradsign_compile_torch.py`"
    )
    print(f"torch {torch.__version__}, one 2048 x 2048 float32 step, compiled:\n")
    for label, function, state in cases:
        compiled = torch.compile(function)
        compiled(value, gradient, state, learning_rate)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            compiled(value, gradient, state, learning_rate)
            times.append(time.perf_counter() - start)
        print(f"- {label}: {statistics.median(times) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
