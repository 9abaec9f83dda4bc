"""Fashion-MNIST CNN: keras_soma against Keras's optimizers (soma paper, Fig. 2).

What it shows: the paper's convolutional network, Conv2D(32, 3)-ReLU,
Conv2D(64, 3)-ReLU, MaxPool(2), Flatten, Dense(128)-ReLU, Dense(10),
trained with each optimizer at its defaults (batch 64, 5 epochs), from the
same initial weights. Writes `cnn.png` (training loss per batch, smoothed by
an exponential moving average with factor 0.95 as in the paper), `cnn.md`
and `cnn.csv` (final smoothed loss, test accuracy, seconds per epoch,
optimizer state bytes per parameter) to `--output-dir`.

Run time on a 2-core laptop CPU: about 6 minutes per optimizer for the
full 5 epochs (50-80 s per epoch), so 40-50 minutes for all seven;
`--epochs 1 --steps-per-epoch 20 --optimizer soma` takes under half a
minute.

    python examples/fashion_mnist_cnn.py                       # all optimizers
    python examples/fashion_mnist_cnn.py --optimizer soma adam
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fashion_mnist_common as common  # noqa: E402

# The paper's settings (the argparse defaults): 5 epochs, batch 64, every
# optimizer at its defaults.
EPOCHS = common.COMPARISON_EPOCHS
BATCH_SIZE = common.COMPARISON_BATCH_SIZE
SEED = common.COMPARISON_SEED
OUTPUT_DIR = common.COMPARISON_OUTPUT_DIR
DEFAULT_OPTIMIZERS = common.COMPARISON_OPTIMIZERS


def parse_args(argv=None):
    return common.parse_comparison_args(__doc__.splitlines()[0], argv)


def main(argv=None):
    args = parse_args(argv)
    return common.run_comparison(
        args, common.build_cnn, "cnn", "CNN", "examples/fashion_mnist_cnn.py", argv
    )


if __name__ == "__main__":
    main()
