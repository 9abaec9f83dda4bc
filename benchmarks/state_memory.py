"""Optimizer state memory: bytes per parameter, keras_soma against Keras.

Builds each optimizer on the soma paper's fashion-MNIST MLP and CNN and
prints the bytes its `optimizer.variables` hold per trainable parameter
(scalars such as the iteration counter aside). No training; runs in
seconds.

    python benchmarks/state_memory.py
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
)

import fashion_mnist_common as common  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _report  # noqa: E402

import keras_soma  # noqa: E402
from keras_soma.memory import state_bytes_per_parameter  # noqa: E402

CONFIGURATIONS = [
    ("Soma", lambda: keras_soma.Soma()),
    (
        "Soma (momentum_dtype=bfloat16)",
        lambda: keras_soma.Soma(momentum_dtype="bfloat16"),
    ),
    (
        "Soma (momentum_dtype=int8, block_size=256)",
        lambda: keras_soma.Soma(momentum_dtype="int8"),
    ),
    (
        "Soma (momentum_dtype=int8, block_size=64)",
        lambda: keras_soma.Soma(momentum_dtype="int8", block_size=64),
    ),
    ("GradSign", lambda: keras_soma.GradSign()),
    ("SM3 (momentum=0)", lambda: keras_soma.SM3(momentum=0.0)),
    ("SM3 (momentum=0.9)", lambda: keras_soma.SM3()),
    (
        "SM3 (momentum=0.9, momentum_dtype=bfloat16)",
        lambda: keras_soma.SM3(momentum_dtype="bfloat16"),
    ),
    (
        "SM3 (momentum=0.9, momentum_dtype=int8, block_size=256)",
        lambda: keras_soma.SM3(momentum_dtype="int8"),
    ),
    ("Keras Adam", keras.optimizers.Adam),
    ("Keras Lion", keras.optimizers.Lion),
    ("Keras Adagrad", keras.optimizers.Adagrad),
    ("Keras SGD (momentum=0.9)", lambda: keras.optimizers.SGD(momentum=0.9)),
    ("Keras SGD", keras.optimizers.SGD),
]


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    models = {"MLP": common.build_mlp(), "CNN": common.build_cnn()}
    header = ["optimizer"] + [
        f"{name} bytes / param ({models[name].count_params():,} params)"
        for name in models
    ]
    rows = []
    for label, factory in CONFIGURATIONS:
        cells = [label]
        for model in models.values():
            optimizer = factory()
            optimizer.build(model.trainable_variables)
            cells.append(
                f"{state_bytes_per_parameter(optimizer, model.trainable_variables):.4f}"
            )
        rows.append(cells)
    print(_report.markdown_table(header, rows))
    print(f"\nKeras {keras.__version__}, {keras.backend.backend()} backend.")


if __name__ == "__main__":
    main()
