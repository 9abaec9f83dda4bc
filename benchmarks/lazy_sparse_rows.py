"""Soma's and GradSign's lazy row mode against their dense default.

What it measures: the time of one step on a 1,000,000 x 64 float32
embedding table (256 MB) given the `tf.IndexedSlices` gradient of 512 rows
(some repeated) an Embedding layer produces, once with the default
`lazy_sparse_updates=False` (the slices stand for a dense gradient: every
row's state decays and every row may move, as the fused XLA kernel
keras_soma uses in `fit`) and once with `lazy_sparse_updates=True` (only
the named rows are read and written). Both run in a `tf.function`, as in
`fit`. The target is a lazy step of at most 5% of a dense one. The sibling
`sparse_rows.py` measures SM3's row path, which is always on.

TensorFlow only (on JAX gradients are always dense).
Run time: about 15 s on a 2-core CPU, 1.5 GB of memory.

    python benchmarks/lazy_sparse_rows.py
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_soma  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sparse_rows import median_milliseconds  # noqa: E402

ROWS = 1_000_000
WIDTH = 64
TOUCHED_ROWS = 512
REPEATS = 10
TARGET_RATIO = 0.05
OPTIMIZERS = {"Soma": keras_soma.Soma, "GradSign": keras_soma.GradSign}


def step_milliseconds(optimizer_class, lazy: bool, table, gradient_parts, repeats):
    """Median time of one `apply` of the row-sliced gradient to `table`."""
    import tensorflow as tf

    optimizer = optimizer_class(lazy_sparse_updates=lazy)
    optimizer.build([table])
    values, indices = gradient_parts
    dense_shape = tf.constant(tuple(table.shape), "int64")

    @tf.function
    def step(values, indices):
        optimizer.apply([tf.IndexedSlices(values, indices, dense_shape)], [table])

    def run():
        step(values, indices)
        optimizer.iterations.numpy()  # wait for the step to finish

    # The optimizer and its state are freed with this frame on return,
    # before the next one is built.
    return median_milliseconds(run, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--touched-rows", type=int, default=TOUCHED_ROWS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "Row-sliced gradients need the TensorFlow backend; received: "
            f"KERAS_BACKEND={keras.backend.backend()!r}"
        )
    import tensorflow as tf

    rng = np.random.default_rng(0)
    table = keras.Variable(
        tf.random.normal((args.rows, args.width), seed=0), name="embeddings"
    )
    row_indices = rng.integers(0, args.rows, args.touched_rows)
    row_indices[-8:] = row_indices[:8]  # some rows named twice, summed first
    indices = tf.constant(row_indices, "int64")
    values = tf.constant(
        rng.standard_normal((args.touched_rows, args.width)).astype("float32")
    )
    unique_rows = len(np.unique(indices.numpy()))
    print(
        f"One step on a {args.rows:,} x {args.width} float32 table, gradient of "
        f"{args.touched_rows} rows ({unique_rows} unique), median of "
        f"{args.repeats}, Keras {keras.__version__}, {os.cpu_count()} CPU cores:"
    )
    print(
        f"  {'optimizer':<10} {'dense (default)':>16} {'lazy':>10} {'lazy/dense':>11}"
    )
    for name, optimizer_class in OPTIMIZERS.items():
        dense_ms = step_milliseconds(
            optimizer_class, False, table, (values, indices), args.repeats
        )
        lazy_ms = step_milliseconds(
            optimizer_class, True, table, (values, indices), args.repeats
        )
        ratio = lazy_ms / dense_ms
        verdict = "meets" if ratio <= TARGET_RATIO else "misses"
        print(
            f"  {name:<10} {dense_ms:13.3f} ms {lazy_ms:7.3f} ms {100 * ratio:9.2f}%"
            f"  ({verdict} the {100 * TARGET_RATIO:.0f}% target)"
        )


if __name__ == "__main__":
    main()
