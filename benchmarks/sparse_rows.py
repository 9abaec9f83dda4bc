"""SM3's row path against its dense step on a large embedding table.

What it measures: the time of one SM3 step on a 1,000,000 x 64 float32
embedding table (256 MB, plus a 256 MB momentum at the default
momentum=0.9), once with a dense gradient of the whole table and once with
a `tf.IndexedSlices` gradient touching 512 rows (576 gradient rows, 64 of
them repeats, summed first), as an Embedding layer produces. Both run in a
`tf.function`, as in `fit`; the dense step runs as the fused XLA kernel
keras_soma uses there. The row path reads and writes only the touched
rows, so its cost should not depend on the table size: the target is a row
step of at most 5% of a dense step.

TensorFlow only (on JAX gradients are always dense).
Run time: about 30 s on a 2-core CPU, 1.5 GB of memory.

    python benchmarks/sparse_rows.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_soma  # noqa: E402

ROWS = 1_000_000
WIDTH = 64
TOUCHED_ROWS = 512
REPEATS = 20
TARGET_RATIO = 0.05


def median_milliseconds(step, repeats: int) -> float:
    """Median wall time of `step()` over `repeats` calls, after two calls
    that trace and compile it."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--touched-rows", type=int, default=TOUCHED_ROWS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "The row path needs the TensorFlow backend; received: "
            f"KERAS_BACKEND={keras.backend.backend()!r}"
        )
    import tensorflow as tf

    rng = np.random.default_rng(0)
    table = keras.Variable(
        tf.random.normal((args.rows, args.width), seed=0), name="embeddings"
    )
    dense_optimizer = keras_soma.SM3()
    row_optimizer = keras_soma.SM3()
    dense_optimizer.build([table])
    row_optimizer.build([table])

    dense_gradient = tf.random.normal((args.rows, args.width), seed=1)
    # `--touched-rows` distinct rows, one in eight of them named twice (an
    # Embedding's gradient repeats the rows of repeated tokens).
    rows = rng.choice(args.rows, args.touched_rows, replace=False)
    rows = rng.permutation(np.concatenate([rows, rows[: args.touched_rows // 8]]))
    indices = tf.constant(rows, "int64")
    values = tf.constant(rng.standard_normal((len(rows), args.width)).astype("float32"))

    @tf.function
    def dense_step(gradient):
        dense_optimizer.apply([gradient], [table])

    @tf.function
    def row_step(values, indices):
        gradient = tf.IndexedSlices(values, indices, (args.rows, args.width))
        row_optimizer.apply([gradient], [table])

    def run_dense():
        dense_step(dense_gradient)
        dense_optimizer.iterations.numpy()  # wait for the step to finish

    def run_rows():
        row_step(values, indices)
        row_optimizer.iterations.numpy()

    dense_ms = median_milliseconds(run_dense, args.repeats)
    row_ms = median_milliseconds(run_rows, args.repeats)
    ratio = row_ms / dense_ms
    print(
        f"SM3 step on a {args.rows:,} x {args.width} float32 table "
        f"(momentum 0.9), median of {args.repeats}, Keras {keras.__version__}, "
        f"{os.cpu_count()} CPU cores:"
    )
    print(f"  dense gradient:                  {dense_ms:9.3f} ms")
    print(
        f"  row path ({args.touched_rows} rows, {len(rows)} gradient rows):"
        f"{row_ms:9.3f} ms"
    )
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(
        f"  row / dense: {100 * ratio:.2f}% ({verdict} the target of "
        f"{100 * TARGET_RATIO:.0f}%)"
    )


if __name__ == "__main__":
    main()
