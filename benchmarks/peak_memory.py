"""Peak training memory, end to end: what `fit` holds on top of the weights.

What it measures: for each (model, optimizer) a fresh Python process builds
the model and its data, then runs `gc.collect()`, reads its resident size
(VmRSS), resets the kernel's high-water mark (writing 5 to
/proc/self/clear_refs) and trains with `model.fit`. The peak (VmHWM) then
holds the weights, the gradients, the optimizer state, every temporary of
the step and any copy that Keras keeps (gradient accumulators, EMA
weights). Where a GPU is present, the device's own peak is read as well
(TensorFlow `get_memory_info`, JAX `memory_stats`).

Models:

* `recommender`: `Embedding(rows, 64)`, mean pooling and `Dense(1)`; each
  example looks up 20 ids drawn from a Zipf law (a batch touches few
  rows, as real traffic does). The table size is `--rows`; `--sizes`
  gives the sizes for the slope of peak against size, from which the
  largest table each optimizer trains in 8 GB and 80 GB is read.
* `transformer`: a decoder-only GPT-2 language model built from a
  keras_hub config (random weights, no download), ~81M parameters at its
  default width of 768; `--transformer-dims` gives the widths for the
  slope of peak against parameters (the same layers and variables at
  each width, so a one-off cost, such as compiling a kernel, shows in the
  intercept and not in the slope).
* `cnn`: the soma paper's fashion-MNIST CNN, on random images.

Reported per row: resident size before fit, the peak above it in bytes per
parameter, the optimizer's state bytes, `(peak - SGD's peak) / state
bytes`, the excess over the target `state + 2% of the weights`, and the
median step time. A second table splits the run at the end of the first
step, which builds the state and traces and compiles the train step: what
that step leaves resident beyond SGD's and the state (a one-off cost),
and the peak of the later steps above it against SGD's (what each step
costs). `--tf-allocator-stats` adds the same for TensorFlow's own tensors.
Run time: the default run takes about an hour and a half on 2 CPU cores
(the transformer 20-50 s per optimizer and width); `--short` runs small
sizes in about two minutes.

On TensorFlow, independent ops run in parallel, so the order of
allocations and the peak vary from run to run (the same SGD run on the
transformer peaked 788-798 MB above its resident size on a quiet machine
and 956 MB beside another job);
`--tf-inter-op-threads 1` runs them one after another, and
`--mmap-threshold 131072` makes glibc return freed blocks of 128 KB and
more to the system, so that a peak holds what is allocated rather than
what the heap kept.

    python benchmarks/peak_memory.py --output-dir docs/results
    python benchmarks/peak_memory.py --short --models recommender
    python benchmarks/peak_memory.py --models transformer --sizes \
        --tf-inter-op-threads 1 --mmap-threshold 131072
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_soma  # noqa: E402
from keras_soma.memory import optimizer_state_bytes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402

# Above its state, an optimizer may peak this fraction of the weights'
# bytes higher than Keras SGD (which keeps no state) does.
TARGET_WEIGHT_FRACTION = 0.02

# name -> (display name, constructor).
OPTIMIZERS = {
    "sgd": ("Keras SGD", lambda: keras.optimizers.SGD(0.01)),
    "adam": ("Keras Adam", keras.optimizers.Adam),
    "adam-accum4": (
        "Keras Adam, 4 accumulation steps",
        lambda: keras.optimizers.Adam(gradient_accumulation_steps=4),
    ),
    "lion": ("Keras Lion", keras.optimizers.Lion),
    "lion-accum4": (
        "Keras Lion, 4 accumulation steps",
        lambda: keras.optimizers.Lion(gradient_accumulation_steps=4),
    ),
    "adagrad": ("Keras Adagrad", keras.optimizers.Adagrad),
    "adafactor": ("Keras Adafactor", keras.optimizers.Adafactor),
    "soma": ("Soma", keras_soma.Soma),
    "soma-bf16": (
        "Soma bf16 state",
        lambda: keras_soma.Soma(momentum_dtype="bfloat16"),
    ),
    "soma-int8": (
        "Soma int8 state",
        lambda: keras_soma.Soma(momentum_dtype="int8"),
    ),
    "soma-int8-lazy": (
        "Soma int8 state, lazy rows",
        lambda: keras_soma.Soma(momentum_dtype="int8", lazy_sparse_updates=True),
    ),
    "soma-lazy": ("Soma lazy rows", lambda: keras_soma.Soma(lazy_sparse_updates=True)),
    "soma-unfused": ("Soma, fused=False", lambda: keras_soma.Soma(fused=False)),
    "soma-accum4": (
        "Soma, 4 accumulation steps",
        lambda: keras_soma.Soma(gradient_accumulation_steps=4),
    ),
    "gradsign": ("GradSign", keras_soma.GradSign),
    "gradsign-lazy": (
        "GradSign lazy rows",
        lambda: keras_soma.GradSign(lazy_sparse_updates=True),
    ),
    "sm3-m0": ("SM3 momentum=0", lambda: keras_soma.SM3(momentum=0.0)),
    "sm3-m0-unblocked": (
        "SM3 momentum=0 blocked=False",
        lambda: keras_soma.SM3(momentum=0.0, blocked=False),
    ),
    "sm3": ("SM3 momentum=0.9", keras_soma.SM3),
    "sm3-int8": (
        "SM3 momentum=0.9 int8",
        lambda: keras_soma.SM3(momentum_dtype="int8"),
    ),
}
# keras_soma's optimizers, whose targets are checked.
KERAS_SOMA_OPTIMIZERS = [
    "soma",
    "soma-bf16",
    "soma-int8",
    "soma-int8-lazy",
    "soma-lazy",
    "soma-unfused",
    "soma-accum4",
    "gradsign",
    "gradsign-lazy",
    "sm3-m0",
    "sm3",
    "sm3-int8",
]
# Lazy row paths: below 2% of the weights above their state at any size.
LAZY_OPTIMIZERS = ["soma-lazy", "soma-int8-lazy", "gradsign-lazy", "sm3-m0", "sm3"]

MODELS = ("recommender", "transformer", "cnn")

RECOMMENDER_WIDTH = 64
IDS_PER_EXAMPLE = 20
ZIPF_EXPONENT = 1.1

DEFAULTS = {
    "rows": 4_000_000,
    "sizes": [1_000_000, 2_000_000, 4_000_000],
    "examples": 4096,
    "batch_size": 256,
    "transformer": dict(layers=6, heads=12, dim=768, vocabulary=50257, context=128),
    "transformer_batch": 4,
    "transformer_steps": 6,
    # 12 heads of 32, 64 and 96: 30M, 81M and 153M parameters.
    "transformer_dims": [384, 768, 1152],
    "cnn_batch": 64,
    "cnn_steps": 40,
}
SHORT = {
    "rows": 200_000,
    "sizes": [50_000, 100_000, 200_000],
    "examples": 1024,
    "batch_size": 256,
    "transformer": dict(layers=2, heads=2, dim=64, vocabulary=2000, context=32),
    "transformer_batch": 4,
    "transformer_steps": 4,
    "transformer_dims": [32, 64, 96],
    "cnn_batch": 64,
    "cnn_steps": 8,
}
BUDGETS_GB = (8, 80)
# What the backends say when an allocation fails (lower case).
OUT_OF_MEMORY = (
    "memoryerror",
    "resourceexhausted",
    "resource_exhausted",
    "out of memory",
    "cannot allocate memory",
    "can't allocate memory",
)


# ----------------------------------------------------------------------
# The worker: one configuration, one process
# ----------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> None:
    """Resets the process's peak resident size (VmHWM), or raises."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError as error:
        raise RuntimeError("cannot reset the peak: /proc/self/clear_refs") from error


def _device_peak_reset():
    """Resets the accelerator's peak counter; returns a reader of it, or
    None on CPU."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_logical_devices("GPU"):
            return None
        tf.config.experimental.reset_memory_stats("GPU:0")
        return lambda: tf.config.experimental.get_memory_info("GPU:0")["peak"]
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            return None
        return lambda: device.memory_stats().get("peak_bytes_in_use")
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated
    return None


def wait_for(variables) -> None:
    """Blocks until the values of `variables` are computed.

    JAX dispatches work asynchronously: a freshly built model's weights are
    still being initialized when `build` returns (and the random
    initializers' temporaries peak at several times the weights), so
    without this the initialization would land inside the measurement.
    """
    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready([variable.value for variable in variables])


class StepTimer(keras.callbacks.Callback):
    """Records the wall time of every training batch."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def _tf_tensor_stats():
    """`(current, peak)` bytes of TensorFlow's CPU allocator, or None where
    it keeps no statistics (only its BFC allocator does:
    `TF_CPU_ALLOCATOR_USE_BFC=true`, set by `--tf-allocator-stats`)."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, RuntimeError):
        return None
    return info["current"], info["peak"]


def _tf_tensor_stats_reset() -> None:
    if _tf_tensor_stats() is not None:
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("CPU:0")


class FirstStep(keras.callbacks.Callback):
    """Splits the measurement at the end of the first training step.

    The first step builds the optimizer's state and traces and compiles the
    train step; what it leaves resident (`resident_after_first`, read after
    `gc.collect()`) is the state plus whatever the compiled step holds.
    The peak is then reset, so that the peak at the end of `fit` is that of
    the later steps alone: each step's own temporaries on top of what stays
    resident. With TensorFlow's allocator statistics the same split is
    read for its tensors."""

    def __init__(self):
        super().__init__()
        self.readings = {}

    def on_train_batch_end(self, batch, logs=None):
        if batch != 0:
            return
        self.readings["first_step_peak"] = _status_kib("VmHWM") * 1024
        tensors = _tf_tensor_stats()
        gc.collect()
        self.readings["resident_after_first"] = _status_kib("VmRSS") * 1024
        if tensors is not None:
            self.readings["tf_tensor_peak_first"] = tensors[1]
            self.readings["tf_tensors_after_first"] = _tf_tensor_stats()[0]
            _tf_tensor_stats_reset()
        _reset_peak()


def _zipf_ids(rng, rows: int, count: int):
    """`count` ids in [0, rows) with Zipf-distributed popularity; which row
    is popular is random, so hot rows are spread over the table."""
    ranks = (rng.zipf(ZIPF_EXPONENT, size=count) - 1) % rows
    # A random row for each rank, without building a permutation of the
    # whole table: an affine map modulo `rows` with a multiplier coprime
    # to it.
    multiplier = int(rng.integers(1, rows))
    while math.gcd(multiplier, rows) != 1:
        multiplier += 1
    offset = int(rng.integers(0, rows))
    return ((ranks * multiplier + offset) % rows).astype(np.int32)


def build_case(
    model_name: str, size: dict, rows: int, seed: int = 0, dim: int | None = None
):
    """`(model, x, y, batch_size, loss)` for one model at one size (`rows`
    for the recommender, the width `dim` for the transformer, default its
    configuration's)."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    if model_name == "recommender":
        ids = _zipf_ids(rng, rows, size["examples"] * IDS_PER_EXAMPLE)
        x = ids.reshape(size["examples"], IDS_PER_EXAMPLE)
        y = rng.standard_normal((size["examples"], 1)).astype(np.float32)
        model = keras.Sequential(
            [
                keras.Input((IDS_PER_EXAMPLE,), dtype="int32"),
                # Zeros, not Keras's random initializer: on TensorFlow the
                # random initializer's temporaries (about 3 x the table)
                # stay resident in the allocator after `build`, and `fit`
                # reuses them, so every optimizer's state up to that size
                # would hide below the pre-fit resident size. The values do
                # not change what a step allocates.
                keras.layers.Embedding(
                    rows, RECOMMENDER_WIDTH, embeddings_initializer="zeros"
                ),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1),
            ],
            name="recommender",
        )
        return model, x, y, size["batch_size"], "mse"
    if model_name == "transformer":
        import keras_hub

        config = dict(size["transformer"])
        if dim is not None:
            config["dim"] = dim
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=config["vocabulary"],
            num_layers=config["layers"],
            num_heads=config["heads"],
            hidden_dim=config["dim"],
            intermediate_dim=4 * config["dim"],
            max_sequence_length=config["context"],
            dropout=0.0,
        )
        model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
        batch = size["transformer_batch"]
        count = batch * size["transformer_steps"]
        tokens = rng.integers(
            0, config["vocabulary"], (count, config["context"] + 1)
        ).astype(np.int32)
        x = {
            "token_ids": tokens[:, :-1],
            "padding_mask": np.ones((count, config["context"]), bool),
        }
        y = tokens[:, 1:]
        return (
            model,
            x,
            y,
            batch,
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    if model_name == "cnn":
        sys.path.insert(
            0,
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"),
        )
        import fashion_mnist_common

        batch = size["cnn_batch"]
        count = batch * size["cnn_steps"]
        x = rng.random((count, 28, 28, 1), dtype=np.float32)
        y = rng.integers(0, 10, count).astype(np.int32)
        return (
            fashion_mnist_common.build_cnn(),
            x,
            y,
            batch,
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    raise ValueError(f"unknown model {model_name!r}")


def add_state_arguments(parser, default_optimizers) -> None:
    """The arguments of the scripts that build this benchmark's transformer
    and an optimizer's state in a fresh process per optimizer
    (`tf_allocator_slack.py`, `jax_compile_memory.py`): `--optimizers`
    (rows of `OPTIMIZERS`), `--short`, `--output` and the hidden
    `--worker`."""
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=default_optimizers,
        choices=sorted(OPTIMIZERS),
        metavar="NAME",
        help=f"rows of peak_memory.py (default: {' '.join(default_optimizers)})",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="peak_memory.py's short transformer (seconds; for tests)",
    )
    parser.add_argument("--output", help="also write the table to this Markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def run_state_workers(args, script: str, measure, environment=None):
    """The fresh-process loop of the scripts that take `add_state_arguments`.

    In a worker (`--worker`), prints `measure(name, short)` for the parent
    and returns None; otherwise runs `script` once per optimizer in
    `args.optimizers`, each in a fresh process with `environment`, and
    returns `{name: measurements}`."""
    if args.worker:
        config = json.loads(args.worker)
        _report.print_result(measure(config["name"], config["short"]))
        return None
    results = {}
    for name in args.optimizers:
        results[name] = _report.run_fresh(
            script, {"name": name, "short": args.short}, environment
        )
        print(f"  {name}: measured", flush=True)
    return results


def take(x, count: int):
    """The first `count` examples of a case's inputs (an array, or a dict
    of arrays for the transformer)."""
    if isinstance(x, dict):
        return {key: value[:count] for key, value in x.items()}
    return x[:count]


def run_worker(config: dict) -> dict:
    """Builds one case, trains one epoch and returns the measurements."""
    size = config["size"]
    model, x, y, batch_size, loss = build_case(
        config["model"], size, config["rows"], config.get("seed", 0), config.get("dim")
    )
    optimizer = OPTIMIZERS[config["optimizer"]][1]()
    model.compile(optimizer=optimizer, loss=loss)
    # Build the layers (the weights) before the measurement starts.
    model(take(x, 1))
    parameters = int(
        sum(int(np.prod(variable.shape)) for variable in model.trainable_variables)
    )
    weight_bytes = int(
        sum(
            int(np.prod(variable.shape))
            * np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize
            for variable in model.trainable_variables
        )
    )
    wait_for(model.variables)
    timer = StepTimer()
    first = FirstStep()
    gc.collect()
    resident_before = _status_kib("VmRSS") * 1024
    tensors_before = _tf_tensor_stats()
    _tf_tensor_stats_reset()
    _reset_peak()
    device_peak = _device_peak_reset()
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer, first],
    )
    wait_for(model.variables + model.optimizer.variables)
    steady_peak = _status_kib("VmHWM") * 1024
    tensors_steady = _tf_tensor_stats()
    readings = first.readings
    if not readings:
        raise RuntimeError("fit ran no step")
    # The peak over the whole of fit: the first step's or a later one's.
    peak = max(readings["first_step_peak"], steady_peak)
    # The first steps compile; the median of the rest is the step time.
    steady = timer.seconds[2:] or timer.seconds
    result = {
        "parameters": parameters,
        "weight_bytes": weight_bytes,
        "resident_before": resident_before,
        "peak": peak,
        "peak_above": peak - resident_before,
        "first_step_peak": readings["first_step_peak"],
        "resident_after_first": readings["resident_after_first"],
        "steady_peak": steady_peak,
        "state_bytes": int(optimizer_state_bytes(model.optimizer)),
        "device_peak": None if device_peak is None else int(device_peak()),
        "step_ms": 1000 * statistics.median(steady),
        "steps": len(timer.seconds),
    }
    if tensors_before is not None:
        result.update(
            tf_tensors_before=tensors_before[0],
            tf_tensors_after_first=readings["tf_tensors_after_first"],
            tf_tensor_peak=max(readings["tf_tensor_peak_first"], tensors_steady[1]),
            tf_tensor_peak_steady=tensors_steady[1],
        )
    return result


# ----------------------------------------------------------------------
# The driver: one subprocess per configuration
# ----------------------------------------------------------------------


def worker_environment(args) -> dict:
    """The environment of the worker processes: this one's, with the
    settings `--tf-inter-op-threads` and `--mmap-threshold` ask for."""
    environment = dict(os.environ)
    if args.tf_inter_op_threads is not None:
        environment["TF_NUM_INTEROP_THREADS"] = str(args.tf_inter_op_threads)
    if args.mmap_threshold is not None:
        environment["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    if args.tf_allocator_stats:
        environment["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    return environment


def run_configuration(config: dict, timeout: float, environment=None) -> dict:
    """Runs one configuration in a fresh process (with `environment`, or
    this one's). A run that is killed or runs out of memory gives a row
    that says so instead of a crash."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        json.dumps(config),
    ]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=environment,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"status": "ok", **json.loads(line[len("RESULT ") :])}
    error = (result.stderr or "").strip().splitlines()
    last_line = error[-1] if error else "no output"
    if result.returncode in (-9, 137):
        return {"status": "out of memory (killed)"}
    if any(marker in (result.stderr or "").lower() for marker in OUT_OF_MEMORY):
        return {"status": f"out of memory ({last_line[:120]})"}
    return {"status": f"failed (exit {result.returncode}): {last_line[:200]}"}


def describe_configuration(config: dict) -> str:
    return f"{config['model']} / {OPTIMIZERS[config['optimizer']][0]}" + (
        f" / {config['rows']:,} rows"
        if config["model"] == "recommender"
        else (f" / width {config['dim']}" if config.get("dim") else "")
    )


def add_derived(rows: list, baseline_name: str = "sgd") -> None:
    """Adds bytes per parameter, the excess over SGD relative to the state,
    and the target check, to rows of one model and size."""
    baseline = next(
        (
            row
            for row in rows
            if row["optimizer"] == baseline_name and row["status"] == "ok"
        ),
        None,
    )
    for row in rows:
        if row["status"] != "ok":
            continue
        row["peak_above_per_param"] = row["peak_above"] / row["parameters"]
        row["state_per_param"] = row["state_bytes"] / row["parameters"]
        if baseline is None:
            continue
        over_sgd = row["peak"] - baseline["peak"]
        row["over_sgd_per_param"] = over_sgd / row["parameters"]
        row["over_sgd_per_state"] = (
            over_sgd / row["state_bytes"] if row["state_bytes"] else None
        )
        # Bytes above the target `state + 2% of the weights`, as a fraction
        # of the weights (<= 0 meets it).
        row["excess_fraction"] = (
            over_sgd - row["state_bytes"] - TARGET_WEIGHT_FRACTION * row["weight_bytes"]
        ) / row["weight_bytes"]
        add_split(row, baseline)


def add_split(row: dict, baseline: dict) -> None:
    """The first-step split of `row` beside SGD's (`baseline`): what the
    first step leaves resident beyond SGD's and the state (a one-off cost,
    in bytes), and the later steps' peak above that resident size beyond
    SGD's (a fraction of the weights); the same for TensorFlow's tensors
    where its allocator statistics were read."""
    if "resident_after_first" not in row or "resident_after_first" not in baseline:
        return

    def retained(entry):
        return entry["resident_after_first"] - entry["resident_before"]

    def steady_above(entry):
        return entry["steady_peak"] - entry["resident_after_first"]

    row["retained_beyond_state"] = (
        retained(row) - retained(baseline) - row["state_bytes"]
    )
    row["steady_over_sgd_fraction"] = (
        steady_above(row) - steady_above(baseline)
    ) / row["weight_bytes"]
    if "tf_tensor_peak" in row and "tf_tensor_peak" in baseline:
        row["tf_tensors_retained_beyond_state"] = (
            row["tf_tensors_after_first"]
            - row["tf_tensors_before"]
            - (baseline["tf_tensors_after_first"] - baseline["tf_tensors_before"])
            - row["state_bytes"]
        )
        row["tf_tensor_excess_fraction"] = (
            row["tf_tensor_peak"]
            - baseline["tf_tensor_peak"]
            - row["state_bytes"]
            - TARGET_WEIGHT_FRACTION * row["weight_bytes"]
        ) / row["weight_bytes"]


def _format(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def table(rows: list) -> str:
    header = (
        "| model | optimizer | params | resident before fit (MB) | peak above it "
        "(bytes / param) | state (bytes / param) | peak - SGD's peak (bytes / "
        "param) | (peak - SGD's peak) / state | above target (x weights) | "
        "device peak (MB) | ms / step |"
    )
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        name = OPTIMIZERS[row["optimizer"]][0]
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {name} | {row['status']} |" + " |" * 8)
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    row["model"],
                    name,
                    f"{row['parameters']:,}",
                    f"{row['resident_before'] / 2**20:.0f}",
                    f"{row['peak_above_per_param']:.2f}",
                    f"{row['state_per_param']:.2f}",
                    _format(row.get("over_sgd_per_param"), "{:.2f}"),
                    _format(row.get("over_sgd_per_state"), "{:.2f}"),
                    _format(row.get("excess_fraction"), "{:+.3f}"),
                    _format(
                        None
                        if row["device_peak"] is None
                        else row["device_peak"] / 2**20,
                        "{:.0f}",
                    ),
                    f"{row['step_ms']:.1f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def target_lines(rows: list) -> list:
    """PASS / FAIL lines of the targets, for keras_soma's optimizers."""
    lines = []
    for row in rows:
        if row["optimizer"] not in KERAS_SOMA_OPTIMIZERS or row["status"] != "ok":
            continue
        excess = row.get("excess_fraction")
        if excess is None:
            continue
        verdict = "PASS" if excess <= 0 else "FAIL"
        lines.append(
            f"- {verdict}  {row['model']}"
            + (f" ({row['rows']:,} rows)" if row["model"] == "recommender" else "")
            + f", {OPTIMIZERS[row['optimizer']][0]}: peak - SGD's peak = state "
            f"{'+' if excess >= 0 else '-'} "
            f"{abs(excess + TARGET_WEIGHT_FRACTION):.3f} x weights "
            f"(target: state + {TARGET_WEIGHT_FRACTION:.2f} x weights)"
        )
    return lines


def split_table(rows: list) -> list:
    """Lines of a table of the first-step split (`add_split`), or none
    where the rows have no split."""
    shown = [row for row in rows if "retained_beyond_state" in row]
    if not shown:
        return []
    tensors = counts_tensors(shown)
    if tensors:
        # TensorFlow's BFC allocator keeps what it frees, so the process's
        # resident size says little about a step: its tensors only.
        headers = [
            "TF tensors after step 1, beyond SGD's and the state (MB)",
            "TF tensor peak - SGD's peak (MB)",
            "TF tensor peak - SGD's - state (x weights)",
        ]
    else:
        headers = [
            "resident after step 1 - before (MB)",
            "of it, beyond SGD's and the state (MB)",
            "later steps' peak above it (MB)",
            "later steps' peak - SGD's (x weights)",
        ]
    headers = ["model", "optimizer", *headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    # add_split gives these columns only beside an SGD row.
    baseline = next((row for row in shown if row["optimizer"] == "sgd"), None)
    for row in shown:
        cells = [row["model"], OPTIMIZERS[row["optimizer"]][0]]
        if not tensors:
            cells += [
                f"{(row['resident_after_first'] - row['resident_before']) / 2**20:.0f}",
                f"{row['retained_beyond_state'] / 2**20:+.0f}",
                f"{(row['steady_peak'] - row['resident_after_first']) / 2**20:.0f}",
                f"{row['steady_over_sgd_fraction']:+.3f}",
            ]
        elif "tf_tensor_excess_fraction" not in row:
            cells += ["-"] * 3
        else:
            over_sgd = row["tf_tensor_peak"] - baseline["tf_tensor_peak"]
            cells += [
                f"{row['tf_tensors_retained_beyond_state'] / 2**20:+.0f}",
                f"{over_sgd / 2**20:+.0f}",
                f"{row['tf_tensor_excess_fraction'] + TARGET_WEIGHT_FRACTION:+.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def counts_tensors(rows: list) -> bool:
    """Whether `rows` come from a run with TensorFlow's allocator statistics
    (`--tf-allocator-stats`), whose split is read on its tensors alone."""
    return any("tf_tensor_peak" in row for row in rows)


def split_target_lines(rows: list) -> list:
    """PASS / FAIL of the target read on the later steps (peak above the
    resident size after the first step, against SGD's: at most 2% of the
    weights) and on TensorFlow's tensors (peak - SGD's: at most the state
    plus 2% of the weights), for keras_soma's optimizers."""
    lines = []
    tensors = counts_tensors(rows)
    for row in rows:
        if row["optimizer"] not in KERAS_SOMA_OPTIMIZERS:
            continue
        name = f"{row['model']}, {OPTIMIZERS[row['optimizer']][0]}"
        steady = row.get("steady_over_sgd_fraction")
        if steady is not None and not tensors:
            verdict = "PASS" if steady <= TARGET_WEIGHT_FRACTION else "FAIL"
            lines.append(
                f"- {verdict}  {name}, steps after the first: peak above the "
                f"resident size after step 1 = SGD's {steady:+.3f} x weights "
                f"(target: + {TARGET_WEIGHT_FRACTION:.2f})"
            )
        tensor = row.get("tf_tensor_excess_fraction")
        if tensor is not None:
            verdict = "PASS" if tensor <= 0 else "FAIL"
            lines.append(
                f"- {verdict}  {name}, TensorFlow's tensors: peak - SGD's peak = "
                f"state {tensor + TARGET_WEIGHT_FRACTION:+.3f} x weights "
                f"(target: state + {TARGET_WEIGHT_FRACTION:.2f} x weights)"
            )
    return lines


def _line(points: list) -> tuple:
    """Least-squares slope and intercept of `(x, y)` points."""
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
        (x - mean_x) ** 2 for x, _ in points
    )
    return slope, mean_y - slope * mean_x


def fit_lines(sweep: dict) -> dict:
    """name -> (bytes per parameter, bytes at 0 parameters, state bytes per
    parameter) of the peak against the parameter count, for every
    optimizer of one model run at three sizes or more (`sweep`: name ->
    `(size, row)` pairs)."""
    lines = {}
    for name, points in sweep.items():
        ok = [row for _, row in points if row["status"] == "ok"]
        if len(ok) < 3:
            continue
        slope, intercept = _line([(row["parameters"], row["peak"]) for row in ok])
        lines[name] = (
            slope,
            intercept,
            ok[-1]["state_bytes"] / ok[-1]["parameters"],
        )
    return lines


def largest_tables(sweep: dict) -> list:
    """`slope_lines` of the recommender, with the rows at which each
    optimizer's peak reaches each budget."""

    def largest(per_param, intercept):
        rows = [
            max(0.0, (budget * 10**9 - intercept) / (per_param * RECOMMENDER_WIDTH))
            for budget in BUDGETS_GB
        ]
        return [f"{count / 1e6:,.1f}M" for count in rows]

    return slope_lines(
        sweep,
        [f"largest table in {budget} GB (rows x 64)" for budget in BUDGETS_GB],
        largest,
    )


def slope_lines(sweep: dict, extra_headers=(), extra=None) -> list:
    """A table of the slope of peak against parameters for each optimizer
    of one model (`sweep` as for `fit_lines`), its intercept, and both
    beside SGD's and the state; `extra(per_param, intercept)` gives the
    cells of `extra_headers`."""
    fitted = fit_lines(sweep)
    baseline = fitted.get("sgd")
    lines = []
    for name, (per_param, intercept, state) in fitted.items():
        above = "-"
        constant = "-"
        if baseline is not None:
            above = f"{per_param - baseline[0] - state:+.2f}"
            constant = f"{(intercept - baseline[1]) / 2**20:+.0f}"
        cells = [
            OPTIMIZERS[name][0],
            f"{per_param:.2f}",
            f"{state:.2f}",
            above,
            f"{intercept / 2**20:.0f}",
            constant,
            *(extra(per_param, intercept) if extra else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return []
    headers = [
        "optimizer",
        "peak bytes / parameter (slope)",
        "state (bytes / param)",
        "slope - SGD's slope - state (bytes / param)",
        "peak at 0 parameters (MB)",
        "at 0 parameters - SGD's (MB)",
        *extra_headers,
    ]
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), *lines]


def slope_target_lines(sweep: dict, model: str = "recommender") -> list:
    """PASS / FAIL of the per-parameter target: the slope of the peak above
    SGD's slope is at most the state plus 2% of the weights (4 bytes)."""
    fitted = fit_lines(sweep)
    if "sgd" not in fitted:
        return []
    lines = []
    allowed = TARGET_WEIGHT_FRACTION * 4
    for name, (per_param, _, state) in fitted.items():
        if name not in KERAS_SOMA_OPTIMIZERS:
            continue
        above = per_param - fitted["sgd"][0] - state
        verdict = "PASS" if above <= allowed else "FAIL"
        lines.append(
            f"- {verdict}  {model} slope, {OPTIMIZERS[name][0]}: "
            f"{above:+.2f} bytes / param above SGD's slope plus the state "
            f"(target: <= {allowed:.2f}, 2% of the weights)"
        )
    return lines


def plot(rows: list, model: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    shown = [row for row in rows if row["status"] == "ok"]
    if not shown:
        return
    names = [OPTIMIZERS[row["optimizer"]][0] for row in shown]
    state = [row["state_per_param"] for row in shown]
    other = [row["peak_above_per_param"] - row["state_per_param"] for row in shown]
    figure, axes = pyplot.subplots(figsize=(9, 4.5))
    positions = range(len(shown))
    axes.bar(positions, state, label="optimizer state", color="#4c72b0")
    axes.bar(
        positions,
        other,
        bottom=state,
        label="everything else fit adds",
        color="#dd8452",
    )
    axes.set_xticks(list(positions), names, rotation=35, ha="right")
    axes.set_ylabel("peak above the resident size before fit\n(bytes / parameter)")
    axes.set_title(f"Peak training memory, {model} ({shown[0]['parameters']:,} params)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="default: all"
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(OPTIMIZERS),
        default=list(OPTIMIZERS),
        help="default: all (SGD is always run: it is the baseline)",
    )
    parser.add_argument("--short", action="store_true", help="small sizes, for CI")
    parser.add_argument(
        "--rows", type=int, default=None, help="embedding rows of the recommender"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=None,
        help="embedding rows for the slope of peak against size (at least 3, "
        "or none to skip the slope)",
    )
    parser.add_argument(
        "--transformer-dims",
        type=int,
        nargs="*",
        default=None,
        help="transformer widths (multiples of its heads) for the slope of "
        "peak against parameters (at least 3, or none to skip the slope)",
    )
    parser.add_argument(
        "--tf-inter-op-threads",
        type=int,
        default=None,
        help="TensorFlow's inter-op threads in each run (TF_NUM_INTEROP_THREADS); "
        "1 runs independent ops one after another, so that the order of "
        "allocations, and the peak, is the same from run to run; default: "
        "TensorFlow's",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="glibc's mmap threshold in bytes in each run "
        "(MALLOC_MMAP_THRESHOLD_): blocks this large or larger are returned "
        "to the system when freed instead of staying in the heap; default: "
        "glibc's (dynamic, up to 32 MB)",
    )
    parser.add_argument(
        "--tf-allocator-stats",
        action="store_true",
        help="TensorFlow only: run TensorFlow's BFC allocator on the CPU "
        "(TF_CPU_ALLOCATOR_USE_BFC=true), which counts the bytes of its "
        "tensors, and report their peak beside the process's; the BFC "
        "allocator keeps what it frees, so the process's own figures then "
        "differ from a default run's",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument(
        "--output-dir", default=None, help="write .md, .csv and .png here"
    )
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    size = SHORT if args.short else DEFAULTS
    if args.rows is None:
        args.rows = size["rows"]
    if args.sizes is None:
        args.sizes = size["sizes"]
    if args.transformer_dims is None:
        args.transformer_dims = size["transformer_dims"]
    heads = size["transformer"]["heads"]
    if args.transformer_dims and (
        len(args.transformer_dims) < 3
        or any(dim < 1 or dim % heads for dim in args.transformer_dims)
    ):
        parser.error(
            f"--transformer-dims must be at least 3 positive multiples of the "
            f"{heads} heads (or none); received {args.transformer_dims}"
        )
    if args.rows < 1:
        parser.error(f"--rows must be an integer >= 1; received {args.rows}")
    if args.sizes and (len(args.sizes) < 3 or min(args.sizes) < 1):
        parser.error(
            f"--sizes must be at least 3 integers >= 1 (or none); received {args.sizes}"
        )
    for name in ("tf_inter_op_threads", "mmap_threshold"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be an integer >= 1; received {value}"
            )
    if args.tf_allocator_stats and keras.backend.backend() != "tensorflow":
        parser.error(
            "--tf-allocator-stats reads TensorFlow's allocator: it needs "
            f"KERAS_BACKEND=tensorflow; received {keras.backend.backend()!r}"
        )
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0; received {args.timeout}")
    if not sys.platform.startswith("linux"):
        parser.error("the CPU peak is read from /proc: Linux only")
    if "sgd" not in args.optimizers:
        args.optimizers = ["sgd", *args.optimizers]
    args.size = size
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return None
    backend = keras.backend.backend()
    environment = worker_environment(args)
    all_rows = []
    # model -> optimizer -> (size, row) pairs, for the slopes.
    sweeps = {}
    for model in args.models:
        # The size that varies: the recommender's rows, the transformer's
        # width; the main table is at the default (`main_size`).
        main_size, sizes = args.rows, []
        if model == "recommender":
            sizes = args.sizes
        elif model == "transformer":
            main_size = args.size["transformer"]["dim"]
            sizes = args.transformer_dims
        for size_value in sorted(set(sizes) | {main_size}):
            group = []
            for name in args.optimizers:
                config = {
                    "model": model,
                    "optimizer": name,
                    "rows": args.rows,
                    "size": args.size,
                }
                if model == "recommender":
                    config["rows"] = size_value
                elif model == "transformer":
                    config["dim"] = size_value
                started = time.perf_counter()
                row = {
                    "model": model,
                    "optimizer": name,
                    "rows": config["rows"],
                    "dim": config.get("dim"),
                    **run_configuration(config, args.timeout, environment),
                }
                print(
                    f"{describe_configuration(config)}: {row['status']}"
                    + (
                        f", peak above pre-fit {row['peak_above'] / 2**20:.0f} MB"
                        if row["status"] == "ok"
                        else ""
                    )
                    + f" ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
                group.append(row)
                if sizes:
                    sweeps.setdefault(model, {}).setdefault(name, []).append(
                        (size_value, row)
                    )
            add_derived(group)
            if size_value == main_size:
                all_rows.extend(group)
    report = [
        f"Peak training memory, {backend} backend",
        "",
        table(all_rows),
        "",
        *target_lines(all_rows),
    ]
    split = split_table(all_rows)
    if split:
        report += [
            "",
            "The first step and the later ones (the peak reset after step 1)"
            + (
                ", TensorFlow's tensors (its BFC allocator's counts):"
                if counts_tensors(all_rows)
                else ":"
            ),
            "",
            *split,
            "",
            *split_target_lines(all_rows),
        ]
    for model, sweep in sweeps.items():
        if model == "recommender":
            lines = largest_tables(sweep)
            title = "Largest embedding table (x 64 float32) per memory budget:"
        else:
            lines = slope_lines(sweep)
            widths = ", ".join(str(size) for size, _ in next(iter(sweep.values())))
            title = (
                f"{model.capitalize()}, peak against parameters over widths {widths}:"
            )
        if lines:
            report += ["", title, "", *lines, "", *slope_target_lines(sweep, model)]
    command = "python " + " ".join(
        ["benchmarks/peak_memory.py", *(argv or sys.argv[1:])]
    )
    report += [
        "",
        f"Produced by `{command}`: Keras {keras.__version__}, {backend} backend, "
        f"{platform.machine()}, {os.cpu_count()} CPU cores.",
    ]
    text = "\n".join(report)
    print("\n" + text)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        stem = os.path.join(args.output_dir, f"peak_memory_{backend}")
        with open(stem + ".md", "w") as handle:
            handle.write(text + "\n")
        fields = sorted({key for row in all_rows for key in row})
        with open(stem + ".csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(all_rows)
        for model in args.models:
            plot(
                [row for row in all_rows if row["model"] == model],
                model,
                f"{stem}_{model}.png",
            )
    return all_rows


if __name__ == "__main__":
    main()
