"""A character-level transformer language model on Shakespeare, one run per
optimizer.

What it shows: how keras_soma's optimizers train a small decoder-only
transformer, against Keras's AdamW (the yardstick for language models) and
Lion. The model is keras_hub's GPT-2 architecture built from a config
(`keras_hub.models.GPT2Backbone` + `GPT2CausalLM` with `preprocessor=None`:
random initialization, nothing downloaded) over characters. The defaults are
nanoGPT's CPU `shakespeare_char` setting: 4 layers, 4 heads, 128 dimensions,
MLP 512, context 64, batch 12, 2000 steps, dropout 0.

Every optimizer trains the same initial weights on the same batches (random
windows of the training text). Every `--eval-every` steps the validation
loss (nats per character, on a fixed set of held-out windows) is measured
with the raw weights and with `keras_soma.PolyakAveraging`'s averaged
weights. SM3 follows its authors' recipe: `keras_soma.schedules.
WarmupCooldown` with a quadratic warm-up over the first 5% of the steps and a
linear cool-down over the last 10%; the other optimizers keep a constant
learning rate.

`--optimizer NAME:lr=RATE:wd=DECAY` gives one optimizer its own learning
rate and weight decay (either may be left out), e.g. to compare tuned
settings in one run: `--optimizer adamw:lr=1e-3:wd=0.4 --optimizer
soma:lr=1e-4:wd=0.125`.

`--optimizer soma-vote` trains Soma with `keras_soma.distribute.
majority_vote` over `--workers` devices (JAX only): each worker keeps its
own momentum on its share of the batch and the update is the sign of the
workers' summed votes. The global batch and the batches are the same as a
single-device run's, so `--optimizer soma --optimizer soma-vote` compares
the vote with Soma on one device. On a CPU the workers are host devices
(XLA_FLAGS is set here, before JAX starts).

Data: by default `tfds.load("tiny_shakespeare")` (downloaded on first use):
its train split for training, its validation split held out. With
`--text-dir DIR`, every file under DIR matching `--text-pattern` (default
`*.txt`) is read, in sorted order, and joined: the first 90% trains and the
last 10% is held out. The vocabulary is every character of the whole corpus.

Writes to `--output-dir`: `shakespeare_lm.png` (validation loss against
step, one colour per optimizer, dashed for the averaged weights),
`shakespeare_lm.md` (the table and a few sampled lines per optimizer),
`shakespeare_lm.csv` (the table) and `shakespeare_lm_curves.csv` (every
evaluation).

Run time on a 2-core CPU (TensorFlow): about 5 minutes per optimizer at the
defaults (2000 steps); `--quick` (a tiny model, 40 steps) well under a
minute per optimizer, most of it tracing.

    python examples/shakespeare_lm.py --optimizer adamw --optimizer soma
    python examples/shakespeare_lm.py --text-dir texts/ --quick
    KERAS_BACKEND=jax python examples/shakespeare_lm.py --optimizer soma \
        --optimizer soma-vote --workers 4
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fashion_mnist_common as common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from host_devices import host_device_flags  # noqa: E402

import keras_soma  # noqa: E402
from keras_soma.memory import state_bytes_per_parameter  # noqa: E402

# nanoGPT's config/train_shakespeare_char.py with its CPU overrides.
DEFAULTS = {
    "layers": 4,
    "heads": 4,
    "dim": 128,
    "mlp_dim": 512,
    "context": 64,
    "batch_size": 12,
    "steps": 2000,
    "eval_every": 250,
    "eval_windows": 480,
    "sample_characters": 300,
}
# --quick: a tiny model and a few dozen steps, for CI.
QUICK = {
    "layers": 1,
    "heads": 2,
    "dim": 32,
    "mlp_dim": 64,
    "context": 32,
    "batch_size": 12,
    "steps": 40,
    "eval_every": 20,
    "eval_windows": 48,
    "sample_characters": 60,
}
SEED = 0
OUTPUT_DIR = "results"
OUTPUT_STEM = "shakespeare_lm"
TEXT_PATTERN = "*.txt"
HELD_OUT_FRACTION = 0.1
AVERAGING_DECAY = 0.99
WARMUP_FRACTION = 0.05
COOLDOWN_FRACTION = 0.1
SAMPLES = 3
TEMPERATURE = 0.8
EVAL_BATCH_SIZE = 48
DEFAULT_OPTIMIZERS = ["adamw", "soma"]
WORKERS = 4
# Trained with keras_soma.distribute.majority_vote over --workers devices.
VOTE_OPTIMIZERS = ("soma-vote",)


# name: (display name, constructor, default arguments, uses the SM3 recipe).
# AdamW at nanoGPT's settings (learning rate 1e-3, weight decay 0.1,
# beta_2 0.99); the sign-based Lion and Soma at a 5x smaller rate with a 5x
# larger decay, so that the decay per step (rate x decay) is AdamW's.
OPTIMIZERS = {
    "adamw": (
        "AdamW",
        keras.optimizers.AdamW,
        {"learning_rate": 1e-3, "weight_decay": 0.1, "beta_2": 0.99},
        False,
    ),
    "adam": ("Adam", keras.optimizers.Adam, {"learning_rate": 1e-3}, False),
    "lion": (
        "Lion",
        keras.optimizers.Lion,
        {"learning_rate": 2e-4, "weight_decay": 0.5},
        False,
    ),
    "soma": (
        "Soma",
        keras_soma.Soma,
        {"learning_rate": 2e-4, "weight_decay": 0.5},
        False,
    ),
    "soma-vote": (
        "Soma, majority vote",
        keras_soma.Soma,
        {"learning_rate": 2e-4, "weight_decay": 0.5},
        False,
    ),
    "soma-bf16": (
        "Soma (bfloat16 momentum)",
        keras_soma.Soma,
        {"learning_rate": 2e-4, "weight_decay": 0.5, "momentum_dtype": "bfloat16"},
        False,
    ),
    "soma-int8": (
        "Soma (int8 momentum)",
        keras_soma.Soma,
        {"learning_rate": 2e-4, "weight_decay": 0.5, "momentum_dtype": "int8"},
        False,
    ),
    "gradsign": ("GradSign", keras_soma.GradSign, {}, False),
    "sm3": ("SM3 (momentum 0.9)", keras_soma.SM3, {}, True),
    "sm3-m0": ("SM3 (momentum 0)", keras_soma.SM3, {"momentum": 0.0}, True),
}


def make_optimizer(
    name: str,
    steps: int,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
) -> keras.optimizers.Optimizer:
    """A fresh optimizer by `--optimizer` name, with the SM3 authors'
    schedule for SM3 over a run of `steps` updates; `learning_rate` and
    `weight_decay` override the name's defaults."""
    if name not in OPTIMIZERS:
        raise ValueError(
            f"Argument `optimizer` must be one of {sorted(OPTIMIZERS)}; "
            f"received: optimizer={name!r}"
        )
    _, constructor, defaults, warmup_cooldown = OPTIMIZERS[name]
    kwargs = dict(defaults)
    if learning_rate is not None:
        kwargs["learning_rate"] = learning_rate
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    if warmup_cooldown:
        rate = kwargs.get("learning_rate", constructor().get_config()["learning_rate"])
        kwargs["learning_rate"] = keras_soma.schedules.WarmupCooldown(
            rate,
            warmup_steps=int(WARMUP_FRACTION * steps),
            total_steps=steps,
            cooldown_steps=int(COOLDOWN_FRACTION * steps),
        )
    return constructor(**kwargs)


def plateau_learning_rate(optimizer) -> float:
    """The optimizer's learning rate (its plateau under a schedule)."""
    rate = optimizer.get_config()["learning_rate"]
    if isinstance(rate, dict):  # a serialized schedule
        rate = rate["config"]["learning_rate"]
    return float(rate)


# ----------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------


def read_text_dir(text_dir: str, pattern: str = TEXT_PATTERN) -> str:
    """Every file under `text_dir` matching `pattern`, in sorted order,
    joined by newlines.

    Raises:
        ValueError: If `text_dir` is not a directory, holds no matching
            file, or the files hold no text.
    """
    if not os.path.isdir(text_dir):
        raise ValueError(
            f"--text-dir must be an existing directory; received {text_dir!r}"
        )
    paths = sorted(
        glob.glob(os.path.join(glob.escape(text_dir), "**", pattern), recursive=True)
    )
    paths = [path for path in paths if os.path.isfile(path)]
    if not paths:
        raise ValueError(
            f"--text-dir must hold at least one file matching {pattern!r}; "
            f"received {text_dir!r}, which holds none"
        )
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            texts.append(handle.read())
    text = "\n".join(texts)
    if not text.strip():
        raise ValueError(
            f"--text-dir must hold some text; received {text_dir!r}, whose "
            f"{len(paths)} file(s) matching {pattern!r} are empty"
        )
    return text


def split_text(text: str, held_out_fraction: float = HELD_OUT_FRACTION):
    """The first `1 - held_out_fraction` of `text` and the rest."""
    boundary = int(round(len(text) * (1.0 - held_out_fraction)))
    return text[:boundary], text[boundary:]


def load_tiny_shakespeare() -> tuple[str, str]:
    """tensorflow-datasets' tiny_shakespeare: `(train, held_out)` texts
    (its train and validation splits)."""
    import tensorflow_datasets as tfds

    splits = tfds.load("tiny_shakespeare", split=["train", "validation"])
    texts = []
    for split in splits:
        (example,) = list(tfds.as_numpy(split))
        texts.append(example["text"].decode("utf-8"))
    return texts[0], texts[1]


class CharacterVocabulary:
    """Maps characters to ids and back; built from the whole corpus, so
    held-out text never meets an unknown character."""

    def __init__(self, text: str):
        self.characters = sorted(set(text))
        self._ids = {
            character: index for index, character in enumerate(self.characters)
        }

    def __len__(self) -> int:
        return len(self.characters)

    def encode(self, text: str) -> np.ndarray:
        return np.array([self._ids[character] for character in text], dtype="int32")

    def decode(self, ids) -> str:
        return "".join(self.characters[int(index)] for index in ids)


def windows(ids: np.ndarray, starts: np.ndarray, context: int):
    """`(inputs, targets)`: the `context` characters from each start, and
    the same shifted by one."""
    positions = starts[:, None] + np.arange(context)[None, :]
    return ids[positions], ids[positions + 1]


def random_windows(ids: np.ndarray, count: int, context: int, seed: int):
    """`count` windows at random starts (with replacement), as nanoGPT's
    `get_batch` draws them."""
    starts = np.random.default_rng(seed).integers(0, len(ids) - context, size=count)
    return windows(ids, starts, context)


def model_inputs(token_ids: np.ndarray) -> dict[str, np.ndarray]:
    """GPT2CausalLM's inputs without a preprocessor: ids and a full mask."""
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


# ----------------------------------------------------------------------
# Model, training, evaluation, sampling
# ----------------------------------------------------------------------


def build_model(vocabulary_size: int, args) -> keras.Model:
    """keras_hub's GPT-2 architecture from a config, randomly initialized."""
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=args.layers,
        num_heads=args.heads,
        hidden_dim=args.dim,
        intermediate_dim=args.mlp_dim,
        dropout=0.0,
        max_sequence_length=args.context,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def evaluation_batch_size(workers: int = 1) -> int:
    """`EVAL_BATCH_SIZE` rounded up to a multiple of `workers` (a data-
    parallel batch splits evenly over the workers)."""
    return -(-EVAL_BATCH_SIZE // workers) * workers


def evaluate(model, validation, workers: int = 1) -> float:
    """Mean cross-entropy in nats per character on the held-out windows."""
    inputs, targets = validation
    return float(
        model.evaluate(
            model_inputs(inputs),
            targets,
            batch_size=evaluation_batch_size(workers),
            verbose=0,
        )
    )


def sample(
    model,
    vocabulary,
    count: int,
    characters: int,
    context: int,
    seed: int,
    workers: int = 1,
) -> list[str]:
    """`count` texts of `characters` characters, each started from a
    newline, drawn at temperature `TEMPERATURE`.

    The window holds the text so far (padded at the end until it is
    `context` long, then its last `context` characters); the causal model's
    output at the last real position gives the next character. The batch
    is padded with empty windows to a multiple of `workers`.
    """
    rng = np.random.default_rng(seed)
    start = vocabulary.encode("\n")
    generated = [list(start) for _ in range(count)]
    batch = -(-count // workers) * workers
    for _ in range(characters):
        length = min(len(generated[0]), context)
        token_ids = np.zeros((batch, context), dtype="int32")
        for row, ids in enumerate(generated):
            token_ids[row, :length] = ids[-length:]
        logits = model.predict_on_batch(model_inputs(token_ids))
        logits = np.asarray(keras.ops.convert_to_numpy(logits))[:count, length - 1]
        logits = logits.astype("float64") / TEMPERATURE
        probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
        for row in range(count):
            generated[row].append(rng.choice(len(vocabulary), p=probabilities[row]))
    return [vocabulary.decode(ids[len(start) :]) for ids in generated]


def vote_distribution(workers: int):
    """A `DataParallel` distribution over the first `workers` devices.

    Raises:
        ValueError: If there are fewer than `workers` devices.
    """
    devices = keras.distribution.list_devices()
    if len(devices) < workers:
        raise ValueError(
            f"--workers must be at most the number of devices ({len(devices)} "
            f"here: {devices}); received {workers}. On a CPU, start Python "
            f"with XLA_FLAGS='{host_device_flags(workers)}'"
        )
    return keras.distribution.DataParallel(devices=devices[:workers])


# `--optimizer NAME:lr=RATE:wd=DECAY`: the settings one optimizer overrides.
OVERRIDES = {"lr": "learning_rate", "wd": "weight_decay"}


def parse_optimizer(text: str) -> tuple[str, dict[str, float]]:
    """`NAME[:lr=RATE][:wd=DECAY]` as `(NAME, {"learning_rate": RATE,
    "weight_decay": DECAY})` (the keys given only).

    Raises:
        ValueError: For an unknown name or setting, or a value that is not
            a number > 0 (a rate) or >= 0 (a decay).
    """
    name, *settings = text.split(":")
    if name not in OPTIMIZERS:
        raise ValueError(
            f"invalid choice: {name!r} (choose from {', '.join(sorted(OPTIMIZERS))})"
        )
    overrides = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        if key not in OVERRIDES:
            raise ValueError(
                f"invalid setting {setting!r} in {text!r}: use {name}:lr=RATE:wd=DECAY"
            )
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (number > 0 if key == "lr" else number >= 0):
            raise ValueError(
                f"{key} must be a number {'> 0' if key == 'lr' else '>= 0'} "
                f"in {text!r}; received {value!r}"
            )
        overrides[OVERRIDES[key]] = number
    return name, overrides


def optimizer_argument(text: str) -> str:
    """argparse's check of one `--optimizer` value."""
    try:
        parse_optimizer(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def train_one(spec: str, args, vocabulary, train, validation) -> dict:
    """Trains a fresh model with one optimizer (`NAME[:lr=RATE][:wd=DECAY]`);
    returns its row."""
    name, overrides = parse_optimizer(spec)
    display_name = OPTIMIZERS[name][0]
    if overrides:
        shown = {"learning_rate": "learning rate", "weight_decay": "weight decay"}
        display_name += (
            " ("
            + ", ".join(f"{shown[key]} {value:g}" for key, value in overrides.items())
            + ")"
        )
    workers = 1
    distribution = None
    if name in VOTE_OPTIMIZERS:
        workers = args.workers
        display_name = f"{display_name} ({workers} workers)"
        distribution = vote_distribution(workers)
    # Before the distribution: clearing the session clears it too.
    keras.backend.clear_session()
    keras.distribution.set_distribution(distribution)
    try:
        return train_model(
            spec, display_name, workers, args, vocabulary, train, validation
        )
    finally:
        keras.distribution.set_distribution(None)


def train_model(
    spec: str, display_name: str, workers: int, args, vocabulary, train, validation
) -> dict:
    """`train_one` in the distribution already set (none for one device)."""
    name, overrides = parse_optimizer(spec)
    keras.utils.set_random_seed(args.seed)
    model = build_model(len(vocabulary), args)
    optimizer = make_optimizer(
        name,
        args.steps,
        overrides.get("learning_rate", args.learning_rate),
        overrides.get("weight_decay", args.weight_decay),
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    if workers > 1:
        keras_soma.distribute.majority_vote(model)
    averaging = keras_soma.PolyakAveraging(
        decay=args.averaging_decay, dynamic_decay=True, evaluate_with_average=False
    )
    train_inputs, train_targets = train
    initial = evaluate(model, validation, workers)
    curve = [(0, initial, initial)]
    train_losses = []
    seconds = 0.0
    step = 0
    print(f"\n=== {display_name} ===", flush=True)
    while step < args.steps:
        end = min(step + args.eval_every, args.steps)
        rows = slice(step * args.batch_size, end * args.batch_size)
        began = time.perf_counter()
        history = model.fit(
            model_inputs(train_inputs[rows]),
            train_targets[rows],
            batch_size=args.batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[averaging],
        )
        seconds += time.perf_counter() - began
        train_losses.append(float(history.history["loss"][-1]))
        step = end
        raw = evaluate(model, validation, workers)
        with averaging.averaged():
            averaged = evaluate(model, validation, workers)
        curve.append((step, raw, averaged))
        print(
            f"{display_name} step {step}/{args.steps}: train loss "
            f"{train_losses[-1]:.4f}, val loss {raw:.4f} (averaged weights "
            f"{averaged:.4f}), {seconds:.0f} s",
            flush=True,
        )
    samples = sample(
        model,
        vocabulary,
        SAMPLES,
        args.sample_characters,
        args.context,
        args.seed,
        workers,
    )
    return {
        "key": spec,
        "optimizer": display_name,
        "learning_rate": plateau_learning_rate(optimizer),
        "weight_decay": float(optimizer.weight_decay or 0.0),
        "initial_val_loss": initial,
        "val_loss": curve[-1][1],
        "averaged_val_loss": curve[-1][2],
        "train_loss": train_losses[-1],
        "seconds": seconds,
        "state_bytes_per_parameter": state_bytes_per_parameter(
            optimizer, model.trainable_variables
        ),
        "parameters": int(
            sum(np.prod(variable.shape) for variable in model.trainable_variables)
        ),
        "curve": curve,
        "samples": samples,
    }


# ----------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------

COLUMNS = [
    ("optimizer", "optimizer", "{}"),
    ("learning_rate", "learning rate", "{:g}"),
    ("weight_decay", "weight decay", "{:g}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("averaged_val_loss", "val loss, averaged weights", "{:.4f}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("seconds", "seconds", "{:.0f}"),
    ("state_bytes_per_parameter", "state bytes / param", "{:.3f}"),
]


def write_outputs(rows, args, data_description: str, command: str) -> dict:
    """Writes the PNG, the Markdown (table and samples) and the CSVs."""
    plt = common.pyplot()
    paths = common.output_paths(args.output_dir, args.output_stem)
    paths["curves"] = os.path.join(args.output_dir, f"{args.output_stem}_curves.csv")
    title = (
        f"Character LM ({args.layers} layers, {args.dim} dims, context "
        f"{args.context}), batch {args.batch_size}, {args.steps} steps"
    )
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, row in enumerate(rows):
        color = f"C{index}"
        steps, raw, averaged = zip(*row["curve"])
        axes.plot(steps, raw, color=color, label=row["optimizer"], linewidth=1.4)
        axes.plot(steps, averaged, color=color, linestyle="--", linewidth=1.0)
    axes.set_xlabel("training step")
    axes.set_ylabel("validation loss (nats / character)")
    axes.set_title(title + "\n(dashed: Polyak-averaged weights)", fontsize=10)
    # The first evaluation (random weights) sits far above the rest.
    finals = [value for row in rows for value in row["curve"][-1][1:]]
    later = [value for row in rows for point in row["curve"][1:] for value in point[1:]]
    if later:
        axes.set_ylim(min(finals) - 0.1, min(max(later), max(finals) + 1.0) + 0.05)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=120)
    plt.close(figure)

    machine = common.machine_description()
    parameters = rows[0]["parameters"] if rows else 0
    with open(paths["md"], "w") as handle:
        handle.write(
            f"{title}\n\n{data_description}; {parameters:,} parameters. "
            "Validation loss in nats per character on "
            f"{args.eval_windows} fixed held-out windows; train loss is the "
            f"mean over the last {args.eval_every} steps; seconds are the "
            "training time (evaluation aside).\n\n"
        )
        handle.write(common.format_table(rows, COLUMNS) + "\n\n")
        handle.write(f"Produced by `{command}` on {machine}.\n\n")
        handle.write(
            f"Samples (temperature {TEMPERATURE}, each started from a newline):\n"
        )
        for row in rows:
            handle.write(f"\n{row['optimizer']}:\n\n```text\n")
            for text in row["samples"]:
                handle.write(text.rstrip("\n") + "\n---\n")
            handle.write("```\n")
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key for key, _, _ in COLUMNS])
        for row in rows:
            writer.writerow([row[key] for key, _, _ in COLUMNS])
    with open(paths["curves"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["optimizer", "step", "val_loss", "averaged_val_loss"])
        for row in rows:
            for step, raw, averaged in row["curve"]:
                writer.writerow([row["key"], step, raw, averaged])
    return paths


# ----------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--optimizer",
        action="append",
        type=optimizer_argument,
        metavar="NAME[:lr=RATE][:wd=DECAY]",
        help="an optimizer to train with, one of "
        + ", ".join(sorted(OPTIMIZERS))
        + ", with its own learning rate and weight decay if given (e.g. "
        "soma:lr=1e-4:wd=0.1); repeat for several; default: "
        + " ".join(DEFAULT_OPTIMIZERS),
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="override every optimizer's learning rate (SM3: the plateau)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="override every optimizer's weight decay (default: AdamW 0.1, "
        "Lion and Soma 0.5, the others none)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny model for a few dozen steps (a smoke test); flags given "
        "explicitly still apply",
    )
    for name, help_text in [
        ("layers", "transformer layers"),
        ("heads", "attention heads"),
        ("dim", "model width"),
        ("mlp_dim", "width of each MLP"),
        ("context", "context length in characters"),
        ("batch_size", "training batch size"),
        ("steps", "training steps"),
        ("eval_every", "evaluate (and print progress) every this many steps"),
        ("eval_windows", "held-out windows in the validation loss"),
        ("sample_characters", "characters per sampled text"),
    ]:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=None,
            help=f"{help_text}; default: {DEFAULTS[name]} ({QUICK[name]} with --quick)",
        )
    parser.add_argument(
        "--workers",
        type=int,
        default=WORKERS,
        help="devices (workers) of the majority vote of --optimizer soma-vote "
        f"(JAX only; host devices on a CPU); default: {WORKERS}",
    )
    parser.add_argument("--seed", type=int, default=SEED, help=f"default: {SEED}")
    parser.add_argument(
        "--averaging-decay",
        type=float,
        default=AVERAGING_DECAY,
        help="decay of PolyakAveraging's moving average (with dynamic decay); "
        f"default: {AVERAGING_DECAY}",
    )
    parser.add_argument(
        "--text-dir",
        default=None,
        help="read the files under this directory matching --text-pattern "
        "instead of tfds' tiny_shakespeare; 90%% trains, 10%% is held out",
    )
    parser.add_argument(
        "--text-pattern",
        default=TEXT_PATTERN,
        help=f"file name pattern under --text-dir; default: {TEXT_PATTERN}",
    )
    parser.add_argument(
        "--output-dir",
        default=OUTPUT_DIR,
        help=f"where the PNG, Markdown and CSVs go; default: {OUTPUT_DIR}",
    )
    parser.add_argument(
        "--output-stem",
        default=OUTPUT_STEM,
        help="file name of the outputs, without extension; default: "
        f"{OUTPUT_STEM} ({OUTPUT_STEM}.png, .md, .csv, _curves.csv)",
    )
    args = parser.parse_args(argv)
    if args.optimizer is None:
        args.optimizer = list(DEFAULT_OPTIMIZERS)
    sizes = QUICK if args.quick else DEFAULTS
    for name, default in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be an integer >= 1; "
                f"received {getattr(args, name)}"
            )
    if args.dim % args.heads:
        parser.error(
            f"--dim must be a multiple of --heads ({args.heads}); received {args.dim}"
        )
    if any(parse_optimizer(spec)[0] in VOTE_OPTIMIZERS for spec in args.optimizer):
        if keras.backend.backend() != "jax":
            parser.error(
                "--optimizer soma-vote needs the JAX backend (set "
                f"KERAS_BACKEND=jax); received backend {keras.backend.backend()!r}"
            )
        if args.workers < 2:
            parser.error(
                f"--workers must be at least 2 (a vote); received {args.workers}"
            )
        for name in ("batch_size", "eval_windows"):
            if getattr(args, name) % args.workers:
                parser.error(
                    f"--{name.replace('_', '-')} must be a multiple of --workers "
                    f"({args.workers}) for soma-vote; received {getattr(args, name)}"
                )
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0; received {args.learning_rate}")
    if args.weight_decay is not None and not args.weight_decay >= 0:
        parser.error(f"--weight-decay must be >= 0; received {args.weight_decay}")
    if not 0.0 < args.averaging_decay < 1.0:
        parser.error(
            f"--averaging-decay must lie in (0, 1); received {args.averaging_decay}"
        )
    if args.text_dir is not None and not os.path.isdir(args.text_dir):
        parser.error(
            f"--text-dir must be an existing directory; received {args.text_dir!r}"
        )
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(
            f"--output-dir must be a directory; received {args.output_dir!r}, "
            "which is a file"
        )
    return args


def load_texts(args) -> tuple[str, str, str]:
    """`(train, held_out, description)` texts from `--text-dir` or tfds."""
    if args.text_dir is None:
        train, held_out = load_tiny_shakespeare()
        description = (
            f"tiny_shakespeare (tfds): {len(train):,} training and "
            f"{len(held_out):,} validation characters"
        )
    else:
        text = read_text_dir(args.text_dir, args.text_pattern)
        train, held_out = split_text(text)
        description = (
            f"the files matching {args.text_pattern!r} under "
            f"{os.path.basename(os.path.normpath(args.text_dir))}/ "
            f"({len(text):,} characters; the first 90% trains, the last 10% "
            "is held out), not tiny_shakespeare"
        )
    shortest = min(len(train), len(held_out))
    if args.context >= shortest:
        raise ValueError(
            f"--context must be shorter than the training and held-out texts "
            f"(at most {shortest - 1} characters here); received {args.context}"
        )
    return train, held_out, description


def use_host_devices(workers: int) -> None:
    """Asks for `workers` host devices in XLA_FLAGS, unless the flags
    already set a host device count. Takes effect only before JAX starts
    its CPU backend (its first device query)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {host_device_flags(workers)}".strip()


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if any(parse_optimizer(spec)[0] in VOTE_OPTIMIZERS for spec in args.optimizer):
        use_host_devices(args.workers)
    train_text, held_out_text, description = load_texts(args)
    vocabulary = CharacterVocabulary(train_text + held_out_text)
    train_ids = vocabulary.encode(train_text)
    held_out_ids = vocabulary.encode(held_out_text)
    train = random_windows(
        train_ids, args.steps * args.batch_size, args.context, args.seed
    )
    validation = random_windows(
        held_out_ids, args.eval_windows, args.context, args.seed + 1
    )
    print(
        f"{description}; vocabulary of {len(vocabulary)} characters; "
        f"uniform guessing scores {math.log(len(vocabulary)):.3f} nats/char",
        flush=True,
    )
    rows = [
        train_one(spec, args, vocabulary, train, validation) for spec in args.optimizer
    ]
    paths = write_outputs(
        rows,
        args,
        description,
        common.command_line("examples/shakespeare_lm.py", argv),
    )
    print("\n" + common.format_table(rows, COLUMNS))
    print(f"\nWrote {', '.join(paths.values())}")
    return rows


if __name__ == "__main__":
    main()
