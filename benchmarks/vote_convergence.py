"""Majority-vote Soma against single-device Soma: fashion-MNIST accuracy
and a transformer language model's validation loss.

    KERAS_BACKEND=jax python benchmarks/vote_convergence.py [--workers 4]
        [--epochs 3] [--seeds 0 1 2] [--batch-size 64] [--model mlp|cnn]
        [--steps-per-epoch N]
    KERAS_BACKEND=jax python benchmarks/vote_convergence.py --model lm
        [--workers 4] [--seeds 0 1 2] [--batch-size 12] [--steps 2000]
        [--text-dir DIR] [--text-pattern '*.txt'] [--output-dir results]
        [--quick]

Trains, per seed, once on one device and once with
`keras_soma.distribute.majority_vote` over WORKERS host devices (XLA_FLAGS
is set here, before JAX starts), with the same global batch and the same
initial weights and data order, and prints a Markdown table of the two
results and their difference:

* `--model mlp` or `cnn`: the soma paper's MLP (Flatten-128-64-10) or CNN
  on fashion-MNIST (from TFDS_DATA_DIR) with `keras_soma.Soma()` at its
  defaults; test accuracy in percent.
* `--model lm`: `examples/shakespeare_lm.py` with `--optimizer soma
  --optimizer soma-vote` (its Soma settings, its defaults: a 4-layer
  character-level GPT-2 for 2000 steps of batch 12; `--quick`: its tiny
  model); validation loss in nats per character, the difference in percent
  of the single device's. Each seed's plot, table and samples go to
  `--output-dir` as `shakespeare_lm_vote_seed<SEED>.*`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

WORKERS = 4
EPOCHS = 3
SEEDS = (0, 1, 2)
BATCH_SIZE = 64
MODELS = {
    "mlp": "fashion-MNIST MLP",
    "cnn": "fashion-MNIST CNN",
    "lm": "character-level language model",
}
LM_OUTPUT_DIR = "results"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"global batch; default: {BATCH_SIZE} (lm: the example's)",
    )
    fashion = parser.add_argument_group("fashion-MNIST (--model mlp or cnn)")
    fashion.add_argument("--epochs", type=int, default=None, help=f"default: {EPOCHS}")
    fashion.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="train on this many batches per epoch (a short run); default: all",
    )
    language = parser.add_argument_group(
        "language model (--model lm; examples/shakespeare_lm.py)"
    )
    language.add_argument(
        "--steps", type=int, default=None, help="training steps; default: the example's"
    )
    language.add_argument(
        "--quick", action="store_true", help="the example's tiny model (a smoke test)"
    )
    language.add_argument(
        "--text-dir",
        default=None,
        help="train on these texts instead of tfds' tiny_shakespeare",
    )
    language.add_argument("--text-pattern", default=None)
    language.add_argument(
        "--output-dir",
        default=None,
        help=f"where each seed's plot and tables go; default: {LM_OUTPUT_DIR}",
    )
    arguments = parser.parse_args(argv)
    language_only = ("steps", "quick", "text_dir", "text_pattern", "output_dir")
    fashion_only = ("epochs", "steps_per_epoch")
    wrong = fashion_only if arguments.model == "lm" else language_only
    for name in wrong:
        if getattr(arguments, name) not in (None, False):
            parser.error(
                f"--{name.replace('_', '-')} does not apply to --model "
                f"{arguments.model}; received {getattr(arguments, name)!r}"
            )
    if arguments.model != "lm":
        arguments.epochs = EPOCHS if arguments.epochs is None else arguments.epochs
        if arguments.batch_size is None:
            arguments.batch_size = BATCH_SIZE
    elif arguments.output_dir is None:
        arguments.output_dir = LM_OUTPUT_DIR
    for name in ("workers", "epochs", "batch_size", "steps"):
        if getattr(arguments, name) is not None and getattr(arguments, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be an integer >= 1; "
                f"received {getattr(arguments, name)}"
            )
    if arguments.workers < 2:
        parser.error(
            f"--workers must be at least 2 (a vote); received {arguments.workers}"
        )
    if arguments.batch_size is not None and arguments.batch_size % arguments.workers:
        parser.error(
            f"--batch-size must be a multiple of --workers ({arguments.workers}); "
            f"received {arguments.batch_size}"
        )
    if arguments.steps_per_epoch is not None and arguments.steps_per_epoch < 1:
        parser.error(
            "--steps-per-epoch must be an integer >= 1; "
            f"received {arguments.steps_per_epoch}"
        )
    return arguments


def command(arguments) -> str:
    """The command line that reproduces a run with `arguments`."""
    seeds = " ".join(str(seed) for seed in arguments.seeds)
    line = "KERAS_BACKEND=jax python benchmarks/vote_convergence.py "
    line += f"--workers {arguments.workers} "
    if arguments.epochs is not None:
        line += f"--epochs {arguments.epochs} "
    line += f"--seeds {seeds} "
    if arguments.batch_size is not None:
        line += f"--batch-size {arguments.batch_size} "
    line += f"--model {arguments.model}"
    for name in ("steps_per_epoch", "steps", "text_dir", "text_pattern"):
        value = getattr(arguments, name)
        if value is not None:
            line += f" --{name.replace('_', '-')} {shlex.quote(str(value))}"
    if arguments.quick:
        line += " --quick"
    if arguments.model == "lm" and arguments.output_dir != LM_OUTPUT_DIR:
        line += f" --output-dir {shlex.quote(arguments.output_dir)}"
    return line


def test_accuracy(workers, seed, arguments):
    import fashion_mnist_common as common
    import keras

    import keras_soma

    distribution = (
        keras.distribution.DataParallel(
            devices=keras.distribution.list_devices("cpu")[:workers]
        )
        if workers > 1
        else None
    )
    keras.distribution.set_distribution(distribution)
    try:
        keras.utils.set_random_seed(seed)
        # Built after seeding: every configuration sees the same batches.
        train, test = common.load_fashion_mnist(
            arguments.batch_size, seed, arguments.steps_per_epoch
        )
        model = {"mlp": common.build_mlp, "cnn": common.build_cnn}[arguments.model]()
        model.compile(
            optimizer=keras_soma.Soma(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        if distribution is not None:
            keras_soma.distribute.majority_vote(model)
        model.fit(train, epochs=arguments.epochs, verbose=0)
        return float(model.evaluate(test, verbose=0, return_dict=True)["accuracy"])
    finally:
        keras.distribution.set_distribution(None)


def language_model_losses(seed, arguments):
    """`(single, vote)`: the example's validation losses, one run each."""
    import shakespeare_lm

    argv = ["--optimizer", "soma", "--optimizer", "soma-vote"]
    argv += ["--workers", str(arguments.workers), "--seed", str(seed)]
    argv += ["--output-dir", arguments.output_dir]
    argv += ["--output-stem", f"shakespeare_lm_vote_seed{seed}"]
    for name in ("batch_size", "steps", "text_dir", "text_pattern"):
        if getattr(arguments, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(arguments, name))]
    if arguments.quick:
        argv.append("--quick")
    single, vote = shakespeare_lm.main(argv)
    return single["val_loss"], vote["val_loss"]


def main(argv=None):
    arguments = parse_arguments(argv)
    from host_devices import host_device_flags

    os.environ["XLA_FLAGS"] = host_device_flags(arguments.workers)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    if keras.backend.backend() != "jax":
        sys.exit("run with KERAS_BACKEND=jax")
    if arguments.model == "lm":
        what = "validation loss (nats / character)"
        setting = "examples/shakespeare_lm.py's Soma"
        setting += " (--quick)" if arguments.quick else ""
        unit = "%"
    else:
        what = "test accuracy (%)"
        setting = f"Soma defaults, {arguments.epochs} epochs"
        unit = "points"
    batch = arguments.batch_size or "the example's"
    header = (
        f"keras {keras.__version__}; {MODELS[arguments.model]}, {setting}, "
        f"global batch {batch}; {what}; command: {command(arguments)}"
    )
    print(header, flush=True)
    lines = []
    differences = []
    for seed in arguments.seeds:
        started = time.perf_counter()
        if arguments.model == "lm":
            single, vote = language_model_losses(seed, arguments)
            differences.append(100 * (vote - single) / single)
            cells = (f"{single:.4f}", f"{vote:.4f}")
        else:
            single = test_accuracy(1, seed, arguments)
            vote = test_accuracy(arguments.workers, seed, arguments)
            differences.append(100 * (vote - single))
            cells = (f"{100 * single:.2f}", f"{100 * vote:.2f}")
        print(
            f"seed {seed}: both runs took {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        lines.append(f"| {seed} | {cells[0]} | {cells[1]} | {differences[-1]:+.2f} |")
    mean = sum(differences) / len(differences)
    lines.append(f"| mean | | | {mean:+.2f} |")
    print(f"\n{header}\n")
    print(
        f"| seed | Soma, 1 device | majority vote, {arguments.workers} workers "
        f"| difference ({unit}) |"
    )
    print("|---:|---:|---:|---:|")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
