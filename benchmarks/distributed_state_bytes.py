"""Optimizer state per device for a 1B-parameter model on 8 devices.

What it computes: the bytes of optimizer state each device holds for a
GPT-style decoder of 1.01B parameters (18 blocks, width 2048, vocabulary
50,304, tied embeddings), under

* replication (tf.distribute MirroredStrategy / TPUStrategy, JAX
  DataParallel): every device holds all of the state;
* MultiWorkerMirroredStrategy with more than one worker: the same, with
  int8 and bfloat16 state stored as int32 and float32 (TensorFlow cannot
  broadcast those dtypes between workers);
* JAX ModelParallel over 8 devices with a Megatron-style LayoutMap
  (column-parallel QKV and MLP-up kernels, row-parallel output and
  MLP-down kernels, the embedding split by vocabulary, norms replicated).

The layouts are not assumed: the script builds each optimizer under the
real DataParallel and ModelParallel distributions (JAX, 8 host devices)
on a small model with one tensor of each kind, reads the sharding of every
state tensor, and applies it to the full-size shapes.

JAX only (it sets XLA_FLAGS for 8 host devices itself). Run time: about
20 s on a 2-core CPU.

    python benchmarks/distributed_state_bytes.py
"""

from __future__ import annotations

import argparse
import os

DEVICES = 8
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={DEVICES}"
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_soma  # noqa: E402
from keras_soma._base import multi_worker_storage_dtype  # noqa: E402
from keras_soma._common import numpy_dtype  # noqa: E402

WIDTH = 2048
BLOCKS = 18
VOCABULARY = 50_304

# Each kind of parameter tensor: its full shape (from the width) and its
# ModelParallel sharding (None: replicated along that axis).
KINDS = {
    "embedding": (lambda d: (VOCABULARY, d), ("model", None)),
    "norm_scale": (lambda d: (d,), (None,)),
    "qkv_kernel": (lambda d: (d, 3 * d), (None, "model")),
    "qkv_bias": (lambda d: (3 * d,), ("model",)),
    "out_kernel": (lambda d: (d, d), ("model", None)),
    "out_bias": (lambda d: (d,), (None,)),
    "up_kernel": (lambda d: (d, 4 * d), (None, "model")),
    "up_bias": (lambda d: (4 * d,), ("model",)),
    "down_kernel": (lambda d: (4 * d, d), ("model", None)),
    "down_bias": (lambda d: (d,), (None,)),
}
BLOCK_KINDS = [
    "norm_scale",
    "qkv_kernel",
    "qkv_bias",
    "out_kernel",
    "out_bias",
    "norm_scale",
    "up_kernel",
    "up_bias",
    "down_kernel",
    "down_bias",
]
# The small stand-in: every dimension divisible by 8.
SMALL_WIDTH = 16
SMALL_VOCABULARY = 104

OPTIMIZERS = [
    ("Adam (Keras)", keras.optimizers.Adam, {}),
    ("Soma", keras_soma.Soma, {}),
    ("Soma, bfloat16 momentum", keras_soma.Soma, {"momentum_dtype": "bfloat16"}),
    ("GradSign", keras_soma.GradSign, {}),
    ("SM3 (momentum 0.9)", keras_soma.SM3, {}),
    ("SM3 (momentum 0)", keras_soma.SM3, {"momentum": 0.0}),
]


def full_parameters():
    """(kind, full shape) of every parameter tensor of the 1B model."""
    kinds = ["embedding"] + BLOCK_KINDS * BLOCKS + ["norm_scale"]
    return [(kind, KINDS[kind][0](WIDTH)) for kind in kinds]


class Parameters(keras.layers.Layer):
    """One weight of each kind, at the small size (`parameters/<kind>`)."""

    def build(self, input_shape=None):
        for kind, (shape_of, _) in KINDS.items():
            shape = shape_of(SMALL_WIDTH)
            if kind == "embedding":
                shape = (SMALL_VOCABULARY, SMALL_WIDTH)
            self.add_weight(shape=shape, initializer="zeros", name=kind)
        self.built = True


def distribution_of(kind):
    devices = keras.distribution.list_devices("cpu")[:DEVICES]
    if len(devices) < DEVICES:
        raise ValueError(
            f"Needs {DEVICES} host devices; XLA_FLAGS gave {len(devices)}."
        )
    if kind == "replicated":
        return keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh((1, DEVICES), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    for name, (_, axes) in KINDS.items():
        layout_map[f"parameters/{name}"] = axes
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def state_rules(optimizer_class, arguments, distribution_kind):
    """{kind: [(dtype, axis or None, mesh devices it is split over)]}: for
    each state tensor of a parameter of that kind, its dtype, the axis it
    runs along (None: the parameter's shape) and the number of shards.
    With `optimizer_class=None`, the same for the parameters themselves."""
    keras.backend.clear_session()
    distribution = distribution_of(distribution_kind)
    with distribution.scope():
        parameters = Parameters(name="parameters")
        parameters.build()
        if optimizer_class is not None:
            optimizer = optimizer_class(**arguments)
            optimizer.build(parameters.trainable_variables)
    rules = {}
    for variable in parameters.trainable_variables:
        kind = variable.path.split("/")[-1]
        if optimizer_class is None:
            states = [variable]
        else:
            # Keras and keras_soma name state "<variable path>_<slot>".
            prefix = variable.path.replace("/", "_") + "_"
            states = [
                state
                for state in optimizer.variables
                if state.path.split("/")[-1].startswith(prefix)
            ]
        if not states:
            raise ValueError(f"No state found for {variable.path}")
        rules[kind] = []
        for state in states:
            if tuple(state.shape) == tuple(variable.shape):
                axis = None
            else:
                # Per-axis state is named "..._<axis>" (SM3's accumulators).
                axis = int(state.path.rsplit("_", 1)[1])
                assert tuple(state.shape) == (variable.shape[axis],), state.path
            sharding = state.value.sharding
            shards = int(
                np.prod(
                    [
                        sharding.mesh.shape[name]
                        for name in sharding.spec
                        if name is not None
                    ]
                )
            )
            dtype = keras.backend.standardize_dtype(state.dtype)
            rules[kind].append((dtype, axis, shards))
    return rules


def bytes_per_device(rules, multi_worker=False):
    total = 0
    for kind, shape in full_parameters():
        for dtype, axis, shards in rules[kind]:
            if multi_worker:
                dtype = multi_worker_storage_dtype(dtype)
            size = int(np.prod(shape)) if axis is None else shape[axis]
            total += size * numpy_dtype(dtype).itemsize // shards
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    parameters = sum(int(np.prod(shape)) for _, shape in full_parameters())
    mib = 2.0**20
    print(
        f"Optimizer state per device in MiB, {parameters:,}-parameter model "
        f"({BLOCKS} blocks, width {WIDTH}), {DEVICES} devices, Keras "
        f"{keras.__version__}:"
    )
    columns = [
        "optimizer",
        "bytes/parameter",
        "replicated",
        "multi-worker",
        "ModelParallel 8",
    ]
    widths = [24, 15, 10, 12, 15]
    print("| " + " | ".join(f"{c:<{w}}" for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")

    def row(label, replicated, multi_worker, sharded):
        cells = [f"{label:<24}", f"{replicated / parameters:>15.3f}"] + [
            f"{value / mib:>{width},.1f}"
            for value, width in zip((replicated, multi_worker, sharded), widths[2:])
        ]
        print("| " + " | ".join(cells) + " |")

    for label, optimizer_class, arguments in OPTIMIZERS:
        replicated = state_rules(optimizer_class, arguments, "replicated")
        sharded = state_rules(optimizer_class, arguments, "model_parallel")
        row(
            label,
            bytes_per_device(replicated),
            bytes_per_device(replicated, multi_worker=True),
            bytes_per_device(sharded),
        )
    weights = bytes_per_device(state_rules(None, {}, "replicated"))
    row(
        "(the float32 weights)",
        weights,
        weights,
        bytes_per_device(state_rules(None, {}, "model_parallel")),
    )


if __name__ == "__main__":
    main()
