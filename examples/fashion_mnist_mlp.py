"""Fashion-MNIST MLP: keras_soma against Keras's optimizers (soma paper, Fig. 1).

What it shows: the paper's Flatten-128-64-10 ReLU network trained with each
optimizer at its defaults (batch 64, 5 epochs), from the same initial
weights. Writes `mlp.png` (training loss per batch, smoothed by an
exponential moving average with factor 0.95 as in the paper), `mlp.md` and
`mlp.csv` (final smoothed loss, test accuracy, seconds per epoch, optimizer
state bytes per parameter) to `--output-dir`.

Run time on a 2-core laptop CPU: under a minute per optimizer for the full
5 epochs, about 7 minutes for all seven; `--epochs 1 --steps-per-epoch 50`
takes seconds (plus about 10 s to decode the dataset once).

    python examples/fashion_mnist_mlp.py                       # all optimizers
    python examples/fashion_mnist_mlp.py --optimizer soma adam
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
        args, common.build_mlp, "mlp", "MLP", "examples/fashion_mnist_mlp.py", argv
    )


if __name__ == "__main__":
    main()
