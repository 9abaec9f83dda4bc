"""Gradient traffic per step: float32 DataParallel against majority-vote Soma.

    KERAS_BACKEND=jax python benchmarks/vote_traffic.py [--workers 8]
        [--hidden 1024]

Builds an MLP (784 -> hidden -> hidden -> 10) under
`keras.distribution.DataParallel` over WORKERS host devices (XLA_FLAGS is
set here, before JAX starts), compiles Keras's JAX train step three ways
(plain DataParallel with Soma, which all-reduces float32 gradients;
`keras_soma.distribute.majority_vote` with `exchange="int8"` and with
`exchange="packed"`), reads the collective operations out of the compiled
HLO (`jax.jit(step).lower(...).compile().as_text()`) and prints:

1. a Markdown table of the bytes the collectives carry per step and the
   bytes each worker sends with the textbook algorithms (ring all-reduce
   `2 (N-1)/N B`, all-gather and all-to-all `(N-1)/N B`, B the size of the
   result), against float32's;
2. the on-paper communication time per step of each exchange for 100M and
   1B parameters on 8 and 64 workers at 10, 25 and 100 Gb/s, from the same
   formulas (no latency term, no overlap with compute).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"
    ),
)

from host_devices import host_device_flags  # noqa: E402

WORKERS = 8
HIDDEN = 1024
BATCH_PER_WORKER = 16
BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
COLLECTIVE = re.compile(
    r"=\s*(?P<type>\([^()]*\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
    r"(?:-start)?\("
)
ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    return parser.parse_args(argv)


def collectives(hlo_text):
    """`[(op, bytes of its result)]` for every collective in `hlo_text`."""
    found = []
    for match in COLLECTIVE.finditer(hlo_text):
        size = 0
        for dtype, dims in ARRAY.findall(match["type"]):
            count = 1
            for dim in filter(None, dims.split(",")):
                count *= int(dim)
            size += count * BYTES[dtype]
        found.append((match["op"], size))
    return found


def sent_per_worker(op, size, workers):
    """Bytes one worker sends for a collective whose result is `size`
    bytes (ring all-reduce; all-gather, all-to-all, reduce-scatter and
    collective-permute as one pass)."""
    fraction = (workers - 1) / workers
    if op == "all-reduce":
        return 2 * fraction * size
    if op == "reduce-scatter":
        return (workers - 1) * size
    if op == "collective-permute":
        return size
    return fraction * size


def exchange_bytes_per_parameter(exchange, workers):
    """Bytes one worker sends per parameter and step, on paper."""
    fraction = (workers - 1) / workers
    if exchange == "float32":
        return 2 * fraction * 4
    if exchange == "int8":
        return 2 * fraction * 1
    return 2 * fraction / 5  # packed: all-to-all + all-gather of 1/5 byte


def compiled_text(workers, hidden, exchange):
    import jax
    import keras
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import keras_soma

    distribution = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices("cpu")[:workers]
    )
    batch = BATCH_PER_WORKER * workers
    rng = np.random.default_rng(0)
    inputs = rng.random((batch, 784)).astype("float32")
    labels = rng.integers(0, 10, batch).astype("int32")
    with distribution.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((784,)),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=keras_soma.Soma(learning_rate=1e-4),
            loss="sparse_categorical_crossentropy",
        )
        if exchange != "float32":
            keras_soma.distribute.majority_vote(model, exchange=exchange)
        # One step builds the optimizer, the metrics and the loss tracker.
        model.fit(inputs, labels, batch_size=batch, epochs=1, verbose=0)
        state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables],
            [v.value for v in model.metrics_variables],
        )
        mesh = distribution.device_mesh.backend_mesh
        sharded = NamedSharding(mesh, PartitionSpec("batch"))
        data = (jax.device_put(inputs, sharded), jax.device_put(labels, sharded))
        text = jax.jit(model.train_step).lower(state, data).compile().as_text()
    parameters = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return text, parameters


def human(size):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.1f} {unit}" if unit != "B" else f"{size:,.0f} B"
        size /= 1024


def seconds(value):
    return f"{value * 1e3:,.1f} ms" if value < 1 else f"{value:,.2f} s"


def main(argv=None):
    arguments = parse_arguments(argv)
    workers = arguments.workers
    os.environ["XLA_FLAGS"] = host_device_flags(workers)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    if keras.backend.backend() != "jax":
        sys.exit("run with KERAS_BACKEND=jax")
    import jax

    print(
        f"keras {keras.__version__}, jax {jax.__version__}; {workers} host "
        f"devices; MLP 784-{arguments.hidden}-{arguments.hidden}-10; command: "
        f"KERAS_BACKEND=jax python benchmarks/vote_traffic.py --workers "
        f"{workers} --hidden {arguments.hidden}\n"
    )
    rows = []
    for exchange in ("float32", "int8", "packed"):
        text, parameters = compiled_text(workers, arguments.hidden, exchange)
        found = collectives(text)
        carried = sum(size for _, size in found)
        sent = sum(sent_per_worker(op, size, workers) for op, size in found)
        kinds = sorted({op for op, _ in found})
        rows.append((exchange, len(found), ", ".join(kinds), carried, sent))
    float_sent = rows[0][4]
    print(f"Parameters: {parameters:,}\n")
    print(
        "| exchange | collectives | kinds | bytes in collectives per step "
        "| bytes each worker sends per step | vs float32 |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for exchange, count, kinds, carried, sent in rows:
        label = "DataParallel (float32)" if exchange == "float32" else exchange
        print(
            f"| {label} | {count} | {kinds} | {human(carried)} | {human(sent)} "
            f"| 1/{float_sent / sent:.1f} |"
        )

    print(
        "\nOn paper: communication time per step (bytes each worker sends / "
        "link bandwidth; ring all-reduce 2(N-1)/N x bytes for float32 and "
        "int8, all-to-all + all-gather (N-1)/N x bytes each for packed "
        "trits; no latency, no overlap)\n"
    )
    bandwidths = (10, 25, 100)
    print(
        "| parameters | workers | exchange | "
        + " | ".join(f"{b} Gb/s" for b in bandwidths)
        + " |"
    )
    print("|---:|---:|---|" + "---:|" * len(bandwidths))
    for parameters in (100_000_000, 1_000_000_000):
        for count in (8, 64):
            for exchange in ("float32", "int8", "packed"):
                per_worker = parameters * exchange_bytes_per_parameter(exchange, count)
                times = [
                    seconds(per_worker * 8 / (bandwidth * 1e9))
                    for bandwidth in bandwidths
                ]
                print(
                    f"| {parameters // 1_000_000:,}M | {count} | {exchange} | "
                    + " | ".join(times)
                    + " |"
                )


if __name__ == "__main__":
    main()
