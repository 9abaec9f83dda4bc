"""Soma's int8 momentum: nearest against stochastic rounding, two codes.

What it measures, on the soma paper's fashion-MNIST MLP, for float32 Soma
and for int8 momentum (`keras_soma._quantize`, blocks of 256) stored with
the linear code (`code / 127 * scale`) rounded to nearest or
stochastically (`floor(x + u)`, u uniform in [0, 1), drawn from a Keras
SeedGenerator; written here only, for the comparison), and with the sqrt
code rounded to nearest (`Soma(momentum_dtype="int8")`, the library's
choice), at each decay factor given:

* test accuracy after `--epochs` epochs, mean over `--seeds` seeds;
* zero codes: the fraction of stored momenta that are exactly 0 at the
  end (for float32 Soma: the fraction that the linear code rounded to
  nearest *would* make 0, measured by quantizing its float32 average);
* stopped: the fraction of parameters that did not move in a step (their
  updated float32 average is exactly 0), over sampled steps of the last
  epoch;
* frozen codes: the fraction of int8 codes a step left unchanged (updates
  below one quantization step), over the same steps.

Run time on a 2-core CPU: about 40 s per run (3 epochs); the default 4
variants x 2 decay factors x 2 seeds is about 11 minutes.

    python benchmarks/int8_rounding.py
    python benchmarks/int8_rounding.py --momentum 0.95 0.99 0.999 --seeds 3
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
)

import fashion_mnist_common as common  # noqa: E402

import keras_soma  # noqa: E402
from keras_soma import _quantize  # noqa: E402
from keras_soma.soma import soma_update  # noqa: E402

EPOCHS = 3
SEEDS = 2
MOMENTA = [0.95, 0.99]
SAMPLE_EVERY = 50  # batches between sampled steps in the last epoch


class StudySoma(keras_soma.Soma):
    """Soma with int8 momentum rounded stochastically, or stored in another
    code (study only)."""

    def __init__(self, stochastic=False, code="sqrt", **kwargs):
        super().__init__(**kwargs)
        self.stochastic = stochastic
        self.code = code

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._rounding_seed = keras.random.SeedGenerator(0)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        codes = self._momentums[index]
        scales = self._momentum_scales[index]
        uniform = None
        if self.stochastic:
            uniform = keras.random.uniform(
                (int(scales.shape[0]), self.block_size), seed=self._rounding_seed
            )
        code = self.code

        def step(value, gradient, codes, scales, learning_rate, momentum, block):
            average = _quantize.dequantize_blockwise(codes, scales, block, code)
            new_value, average = soma_update(
                value, gradient, average, learning_rate, momentum
            )
            return (
                new_value,
                *_quantize.quantize_blockwise(average, block, uniform, code),
            )

        self.update_with(
            step,
            variable,
            gradient,
            [codes, scales],
            learning_rate,
            hyperparameters=(self.momentum, self.block_size),
        )


VARIANTS = {
    "float32": lambda momentum: keras_soma.Soma(momentum=momentum),
    "int8 linear, nearest": lambda momentum: StudySoma(
        code="linear", momentum=momentum, momentum_dtype="int8"
    ),
    "int8 linear, stochastic": lambda momentum: StudySoma(
        stochastic=True, code="linear", momentum=momentum, momentum_dtype="int8"
    ),
    "int8 sqrt, nearest (library)": lambda momentum: keras_soma.Soma(
        momentum=momentum, momentum_dtype="int8"
    ),
    "int8 sqrt, nearest, block 64": lambda momentum: keras_soma.Soma(
        momentum=momentum, momentum_dtype="int8", block_size=64
    ),
}
DEFAULT_VARIANTS = list(VARIANTS)[:4]


def numpy_of(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


class StepSampler(keras.callbacks.Callback):
    """Samples, in the last epoch, which parameters and codes a step left
    unchanged."""

    def __init__(self, epochs):
        super().__init__()
        self.last_epoch = epochs - 1
        self.epoch = 0
        self.stopped, self.frozen = [], []
        self.before = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _codes(self):
        optimizer = self.model.optimizer
        if optimizer.momentum_dtype != "int8":
            return None
        return [numpy_of(codes) for codes in optimizer._momentums]

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == self.last_epoch and batch % SAMPLE_EVERY == 1:
            weights = [numpy_of(v) for v in self.model.trainable_variables]
            self.before = (weights, self._codes())

    def on_train_batch_end(self, batch, logs=None):
        if self.before is None:
            return
        weights, codes = self.before
        self.before = None
        after = [numpy_of(v) for v in self.model.trainable_variables]
        unmoved = sum(int((a == b).sum()) for a, b in zip(after, weights))
        total = sum(a.size for a in after)
        self.stopped.append(unmoved / total)
        if codes is not None:
            unchanged = sum(int((a == b).sum()) for a, b in zip(self._codes(), codes))
            self.frozen.append(unchanged / total)


def zero_code_fraction(optimizer) -> float:
    zeros = total = 0
    for average in optimizer._momentums:
        if optimizer.momentum_dtype == "int8":
            codes = numpy_of(average)
        else:
            codes, _ = _quantize.quantize_blockwise(average, 256, code="linear")
            codes = numpy_of(codes)
        zeros += int((codes == 0).sum())
        total += codes.size
    return zeros / total


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--momentum", type=float, nargs="+", default=MOMENTA)
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument(
        "--variant", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS)
    )
    common.add_common_arguments(
        parser,
        EPOCHS,
        common.COMPARISON_BATCH_SIZE,
        common.COMPARISON_SEED,
        common.COMPARISON_OUTPUT_DIR,
    )
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    train, test = common.load_data(args)
    print(f"# {common.command_line('benchmarks/int8_rounding.py', argv)}")
    print(
        "| momentum | rounding | mean test accuracy | per seed | zero codes "
        "| stopped per step | frozen codes per step |"
    )
    print("|---|---|---|---|---|---|---|")
    for momentum in args.momentum:
        for variant in args.variant:
            accuracies, zeros, stopped, frozen = [], [], [], []
            for seed in range(args.seed, args.seed + args.seeds):
                common.OPTIMIZERS["study"] = functools.partial(
                    VARIANTS[variant], momentum
                )
                sampler = StepSampler(args.epochs)
                result = common.train_and_evaluate(
                    common.build_mlp,
                    "study",
                    train,
                    test,
                    args.epochs,
                    seed,
                    verbose=0,
                    callbacks=[sampler],
                )
                accuracies.append(result["test_accuracy"])
                zeros.append(zero_code_fraction(result["model"].optimizer))
                stopped.append(statistics.fmean(sampler.stopped))
                if sampler.frozen:
                    frozen.append(statistics.fmean(sampler.frozen))
            per_seed = ", ".join(f"{value:.4f}" for value in accuracies)
            frozen_text = f"{statistics.fmean(frozen):.4f}" if frozen else "-"
            print(
                f"| {momentum} | {variant} | {statistics.fmean(accuracies):.4f} "
                f"| {per_seed} | {statistics.fmean(zeros):.4f} "
                f"| {statistics.fmean(stopped):.4f} | {frozen_text} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
