"""The examples in their short mode, on the real fashion-MNIST data.

Each example is run in this process through its `main(argv)` with one
short epoch, and its outputs are checked: the PNG, Markdown and CSV exist,
and the CSV holds sane numbers (accuracy in [0, 1], finite losses, and the
optimizer state bytes per parameter each optimizer is known to keep).

The data comes through tensorflow-datasets. When `TFDS_DATA_DIR` is unset
and `../shared/tensorflow_datasets` (beside the repository, as in CI) exists,
that directory is used. When fashion_mnist is not prepared there and its
download host cannot be reached, the tests are skipped with the reason.
"""

from __future__ import annotations

import argparse
import csv
import glob
import importlib.util
import math
import os
import shlex
import socket
import subprocess
import sys

import keras
import pytest
from registry import REGISTRY, STATE_FORMATS

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPOSITORY, "examples")
SHARED_DATA_DIR = os.path.join(
    os.path.dirname(REPOSITORY), "shared", "tensorflow_datasets"
)
if "TFDS_DATA_DIR" not in os.environ and os.path.isdir(SHARED_DATA_DIR):
    os.environ["TFDS_DATA_DIR"] = SHARED_DATA_DIR

DOWNLOAD_HOST = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"

# Shakespeare's plays as plain text (Project Gutenberg), for
# examples/shakespeare_lm.py: SHAKESPEARE_TEXT_DIR, else beside the
# repository as in CI.
SHAKESPEARE_TEXT_DIR = os.environ.get(
    "SHAKESPEARE_TEXT_DIR",
    os.path.join(os.path.dirname(REPOSITORY), "shared", "text", "shakespeare"),
)

# A short run: enough batches for the loss to move, few enough for the
# whole file to take about a minute on two CPU cores.
SHORT_RUN = ["--epochs", "1", "--steps-per-epoch", "20"]

# Optimizer state bytes per parameter of Keras's own optimizers at their
# defaults, whatever the model: Adam keeps two float32 moments, Adagrad and
# RMSprop one, Lion one, SGD (momentum 0) none.
KERAS_STATE_BYTES = {
    "adam": 8.0,
    "adagrad": 4.0,
    "rmsprop": 4.0,
    "lion": 4.0,
    "sgd": 0.0,
}

pytestmark = pytest.mark.slow


def load_example(name: str):
    """Imports `examples/<name>.py` as a module."""
    path = os.path.join(EXAMPLES, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def host_reachable(host: str, port: int = 80, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def common():
    """The examples' shared module, or a skip if their extras are missing."""
    pytest.importorskip("tensorflow_datasets", reason="needs the `examples` extra")
    pytest.importorskip("matplotlib", reason="needs the `examples` extra")
    sys.path.insert(0, EXAMPLES)
    import fashion_mnist_common

    return fashion_mnist_common


@pytest.fixture(scope="module")
def data_dir(common):
    """The tfds data directory to pass as `--data-dir`, or a skip when
    fashion_mnist is neither prepared nor downloadable."""
    import tensorflow_datasets as tfds

    directory = os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )
    if tfds.builder("fashion_mnist", data_dir=directory).is_prepared():
        return directory
    if not host_reachable(DOWNLOAD_HOST):
        pytest.skip(
            f"fashion_mnist is not prepared in {directory} (set TFDS_DATA_DIR) "
            f"and {DOWNLOAD_HOST} cannot be reached to download it"
        )
    return directory


def data_args(data_dir: str, seed: int, steps_per_epoch: int):
    """The common arguments `load_data` reads, for a short run on batches
    of 64."""
    return argparse.Namespace(
        batch_size=64,
        seed=seed,
        steps_per_epoch=steps_per_epoch,
        data_dir=data_dir,
        manual_dir=None,
    )


def optimizer_key(common, optimizer_class) -> str:
    """The examples' `--optimizer` name of a keras_soma optimizer class."""
    for key, value in common.OPTIMIZERS.items():
        if value is optimizer_class:
            return key
    raise AssertionError(f"{optimizer_class.__name__} missing from OPTIMIZERS")


def state_format_key(common, spec) -> str:
    """The examples' `--optimizer` name of a `STATE_FORMATS` row: its
    class's name plus the row's suffix, e.g. `soma-int8`."""
    key = optimizer_key(common, spec.cls) + spec.suffix.lower()
    assert key in common.OPTIMIZERS, f"{spec.name} missing from OPTIMIZERS as {key}"
    return key


def mlp_state_bytes(common):
    """Expected state bytes per parameter on the MLP, by `--optimizer`
    name: the registry's figure for every keras_soma optimizer at its
    defaults, and KERAS_STATE_BYTES for Keras's."""
    expected = dict(KERAS_STATE_BYTES)
    for spec in REGISTRY.values():
        defaults = [
            value for arguments, value in spec.bytes_per_parameter if not arguments
        ]
        assert defaults, f"registry row of {spec.name} lacks the default state bytes"
        expected[optimizer_key(common, spec.cls)] = defaults[0]
    for spec in STATE_FORMATS.values():
        own = [
            value
            for arguments, value in spec.bytes_per_parameter
            if arguments == spec.arguments
        ]
        assert own, f"registry row of {spec.name} lacks its own state bytes"
        expected[state_format_key(common, spec)] = own[0]
    return expected


def test_state_format_names_make_the_rows_optimizer(common):
    # `--optimizer soma-int8` is the registry's Soma-int8 row: the same
    # constructor arguments, everything else at the defaults.
    for spec in STATE_FORMATS.values():
        made = common.make_optimizer(state_format_key(common, spec))
        assert type(made) is spec.cls
        assert made.get_config() == spec.make().get_config(), spec.name
        assert state_format_key(common, spec) in common.DISPLAY_NAMES


def read_outputs(output_dir, stem, script):
    """Checks that `<stem>.png/.md/.csv` exist and look right; returns the
    CSV's rows."""
    png, markdown, table = (
        os.path.join(output_dir, f"{stem}.{extension}")
        for extension in ("png", "md", "csv")
    )
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    assert os.path.getsize(png) > 10_000, f"{png} is suspiciously small"

    with open(markdown) as handle:
        text = handle.read()
    assert "|---|" in text, text
    assert f"Produced by `python examples/{script}.py" in text
    assert "CPU cores" in text  # the machine is named

    with open(table, newline="") as handle:
        return list(csv.DictReader(handle))


def check_accuracy_and_loss(row, loss_key="final_smoothed_loss"):
    accuracy = float(row["test_accuracy"])
    loss = float(row[loss_key])
    assert 0.0 <= accuracy <= 1.0, row
    # 20 batches of training beat guessing among 10 classes.
    assert accuracy > 0.1, row
    assert math.isfinite(loss) and loss > 0.0, row


def check_outputs(output_dir, stem, script, expected_state_bytes):
    """Checks `<stem>.png/.md/.csv` of an optimizer comparison; returns the
    CSV rows. `expected_state_bytes` lists each row's state bytes per
    parameter, in order."""
    rows = read_outputs(output_dir, stem, script)
    assert len(rows) == len(expected_state_bytes), rows
    for row, expected_bytes in zip(rows, expected_state_bytes):
        check_accuracy_and_loss(row)
        assert float(row["learning_rate"]) > 0.0, row
        seconds = float(row["seconds_per_epoch"])
        assert math.isfinite(seconds) and seconds > 0.0, row
        assert float(row["state_bytes_per_parameter"]) == pytest.approx(
            expected_bytes, rel=1e-6
        ), row
    return rows


def test_fashion_mnist_mlp_short(common, data_dir, tmp_path):
    # Every keras_soma optimizer in the registry and every state format
    # (Soma int8), plus SGD (no state).
    expected = mlp_state_bytes(common)
    names = (
        [optimizer_key(common, spec.cls) for spec in REGISTRY.values()]
        + [state_format_key(common, spec) for spec in STATE_FORMATS.values()]
        + ["sgd"]
    )
    example = load_example("fashion_mnist_mlp")
    example.main(
        [
            "--optimizer",
            *names,
            *SHORT_RUN,
            "--data-dir",
            data_dir,
            "--output-dir",
            str(tmp_path),
        ]
    )
    rows = check_outputs(
        tmp_path, "mlp", "fashion_mnist_mlp", [expected[name] for name in names]
    )
    assert [row["optimizer"] for row in rows] == [
        common.DISPLAY_NAMES[name] for name in names
    ]


def test_fashion_mnist_cnn_short(common, data_dir, tmp_path):
    # Soma's state bytes do not depend on the model.
    example = load_example("fashion_mnist_cnn")
    example.main(
        [
            "--optimizer",
            "soma",
            *SHORT_RUN,
            "--data-dir",
            data_dir,
            "--output-dir",
            str(tmp_path),
        ]
    )
    check_outputs(tmp_path, "cnn", "fashion_mnist_cnn", [4.0])


def test_decay_factor_short(common, data_dir, tmp_path):
    example = load_example("decay_factor")
    example.main(
        [
            "--momentums",
            "0.5",
            "0.999",
            *SHORT_RUN,
            "--data-dir",
            data_dir,
            "--output-dir",
            str(tmp_path),
        ]
    )
    rows = check_outputs(tmp_path, "decay_factor", "decay_factor", [4.0, 4.0])
    assert [float(row["momentum"]) for row in rows] == [0.5, 0.999]


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="model.export's SavedModel on PyTorch goes through torch.export and "
    "torch_xla's StableHLO, which the torch extra does not install (and with "
    "Keras 3.15.1 and torch 2.13 torch.export already rejects Keras's "
    "dynamic_shapes)",
)
def test_sm3_polyak_serving_short(common, data_dir, tmp_path):
    export_dir = tmp_path / "served"
    example = load_example("sm3_polyak_serving")
    example.main(
        [
            *SHORT_RUN,
            "--data-dir",
            data_dir,
            "--output-dir",
            str(tmp_path),
            "--export-dir",
            str(export_dir),
        ]
    )
    assert (export_dir / "saved_model.pb").exists()
    raw, averaged, served = read_outputs(
        tmp_path, "sm3_polyak_serving", "sm3_polyak_serving"
    )
    assert [row["weights"] for row in (raw, averaged, served)] == [
        "raw",
        "Polyak average",
        "Polyak average",
    ]
    for row in (raw, averaged, served):
        check_accuracy_and_loss(row, loss_key="test_loss")
    # The reloaded SavedModel serves the averaged weights.
    # (Keras's accuracy metric is float32, the served one float64.)
    assert float(served["test_accuracy"]) == pytest.approx(
        float(averaged["test_accuracy"]), abs=1e-6
    )
    assert float(served["test_loss"]) == pytest.approx(
        float(averaged["test_loss"]), rel=1e-5
    )


def test_seed_repeats_short(common, data_dir, tmp_path):
    example = load_example("seed_repeats")
    summaries = example.main(
        [
            "--optimizer",
            "soma",
            "adam",
            "--seeds",
            "2",
            *SHORT_RUN,
            "--data-dir",
            data_dir,
            "--output-dir",
            str(tmp_path),
        ]
    )
    rows = read_outputs(tmp_path, "seeds_mlp", "seed_repeats")
    assert [row["optimizer"] for row in rows] == ["Soma", "Adam"]
    for row, summary, expected_bytes in zip(rows, summaries, [4.0, 8.0]):
        per_seed = [float(value) for value in row["per_seed"].split()]
        assert len(per_seed) == int(row["seeds"]) == 2
        # 20 batches of training beat guessing among 10 classes.
        assert all(0.1 < accuracy <= 1.0 for accuracy in per_seed), per_seed
        # The summary columns are those of the per-seed accuracies.
        assert float(row["mean_test_accuracy"]) == pytest.approx(
            sum(per_seed) / 2, abs=1e-4
        )
        assert float(row["min_test_accuracy"]) == pytest.approx(min(per_seed), abs=1e-4)
        assert float(row["max_test_accuracy"]) == pytest.approx(max(per_seed), abs=1e-4)
        assert float(row["std_test_accuracy"]) == pytest.approx(
            abs(per_seed[0] - per_seed[1]) / math.sqrt(2), abs=1e-4
        )
        assert float(row["state_bytes_per_parameter"]) == pytest.approx(expected_bytes)
        assert summary["accuracies"] == pytest.approx(per_seed, abs=1e-4)
    # Two seeds are two different runs: the weights and the batch order
    # differ, so the accuracies do too.
    assert len(set(summaries[0]["accuracies"])) == 2


def test_runs_in_one_process_see_the_same_batches(common, data_dir):
    """Every optimizer of a comparison trains on the same batches in the
    same order. A tf.data pipeline reshuffled each epoch continues its
    sequence of orders when it is iterated again, so a second run on the
    same dataset object would see other batches: `load_data`'s
    `make_train` builds one per run, after seeding."""
    import numpy as np

    args = data_args(data_dir, seed=3, steps_per_epoch=3)

    class LossRecorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses = []

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(float(logs["loss"]))

    make_train, test = common.load_data(args)
    runs = []
    for _ in range(2):
        recorder = LossRecorder()
        common.train_and_evaluate(
            common.build_mlp,
            "sgd",
            make_train,
            test.take(1),
            epochs=2,
            seed=args.seed,
            verbose=0,
            callbacks=[recorder],
        )
        runs.append(recorder.losses)
    # The same optimizer from the same weights on the same batches: the
    # same losses, batch by batch, over both epochs.
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)
    # What the fresh pipeline avoids: iterated again, one dataset object
    # gives other batches.
    keras.utils.set_random_seed(args.seed)
    train = make_train()
    first, again = (
        np.concatenate([labels.numpy() for _, labels in train]) for _ in range(2)
    )
    assert not np.array_equal(first, again)


def test_learning_rate_sweep_short(common, data_dir, tmp_path):
    example = load_example("learning_rate_sweep")
    example.main(
        [
            "--optimizer",
            "gradsign",
            "--learning-rates",
            "1e-3",
            "1e-2",
            *SHORT_RUN,
            "--data-dir",
            data_dir,
            "--output-dir",
            str(tmp_path),
        ]
    )
    rows = read_outputs(tmp_path, "sweep_gradsign", "learning_rate_sweep")
    # The two learning rates, then Adam at its defaults as the baseline.
    assert [row["optimizer"] for row in rows] == ["GradSign", "GradSign", "Adam"]
    assert [float(row["learning_rate"]) for row in rows] == pytest.approx(
        [1e-3, 1e-2, keras.optimizers.Adam().get_config()["learning_rate"]]
    )
    for row, expected_bytes in zip(rows, [1.0, 1.0, 8.0]):
        check_accuracy_and_loss(row)
        assert float(row["state_bytes_per_parameter"]) == pytest.approx(expected_bytes)


def test_cosine_schedule_decays_to_zero_over_the_run(common, data_dir):
    """`schedule="cosine"` decays the rate from its value to 0 over every
    step of the run; the row keeps the initial rate. An unknown schedule is
    named."""
    args = data_args(data_dir, seed=1, steps_per_epoch=4)
    make_train, test = common.load_data(args)
    rates = []

    class RateRecorder(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            rates.append(float(self.model.optimizer.learning_rate))

    row = common.train_and_evaluate(
        common.build_mlp,
        "gradsign",
        make_train,
        test.take(1),
        epochs=2,
        seed=args.seed,
        learning_rate=1e-3,
        verbose=0,
        callbacks=[RateRecorder()],
        schedule="cosine",
    )
    assert row["learning_rate"] == pytest.approx(1e-3)
    # 2 epochs of 4 steps: step t uses 1e-3 * (1 + cos(pi * t / 8)) / 2.
    expected = [5e-4 * (1 + math.cos(math.pi * step / 8)) for step in range(8)]
    assert rates == pytest.approx(expected, rel=1e-5)
    optimizer = row["model"].optimizer
    assert float(optimizer.learning_rate) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        common.train_and_evaluate(
            common.build_mlp,
            "sgd",
            make_train,
            test.take(1),
            epochs=1,
            seed=args.seed,
            verbose=0,
            schedule="linear",
        )


def shakespeare_text_arguments() -> list[str]:
    """The language model's `--text-dir`/`--text-pattern` for the shared
    Shakespeare texts; skips the test where they are missing."""
    if not glob.glob(os.path.join(SHAKESPEARE_TEXT_DIR, "*_gut.txt")):
        pytest.skip(
            f"no Shakespeare texts in {SHAKESPEARE_TEXT_DIR} (set SHAKESPEARE_TEXT_DIR)"
        )
    return ["--text-dir", SHAKESPEARE_TEXT_DIR, "--text-pattern", "*_gut.txt"]


only_on_tensorflow_for_time = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the language model's short mode is slow off TensorFlow: on a "
    "loaded 2-core CPU it took 45 s on TensorFlow, 69 s on JAX and 114 s on "
    "PyTorch (mostly compiling keras_hub's GPT-2); the example itself runs "
    "on every backend",
)


@only_on_tensorflow_for_time
def test_shakespeare_lm_quick(common, tmp_path):
    pytest.importorskip("keras_hub", reason="needs the `examples` extra")
    text_arguments = shakespeare_text_arguments()
    example = load_example("shakespeare_lm")
    # Soma, and SM3 for the warm-up/cool-down schedule.
    names = ["soma", "sm3-m0"]
    returned = example.main(
        [
            "--quick",
            *[argument for name in names for argument in ("--optimizer", name)],
            *text_arguments,
            "--output-dir",
            str(tmp_path),
        ]
    )
    rows = read_outputs(tmp_path, "shakespeare_lm", "shakespeare_lm")
    assert [row["optimizer"] for row in rows] == [
        example.OPTIMIZERS[name][0] for name in names
    ]
    for row, result in zip(rows, returned):
        for key in ("val_loss", "averaged_val_loss", "train_loss"):
            loss = float(row[key])
            assert math.isfinite(loss) and loss > 0.0, row
        # The loss falls from that of the random initial weights.
        assert float(row["val_loss"]) < result["initial_val_loss"], row
        assert float(row["averaged_val_loss"]) < result["initial_val_loss"], row
        assert float(row["seconds"]) > 0.0, row
        assert len(result["samples"]) == example.SAMPLES
        assert all(
            len(text) == example.QUICK["sample_characters"]
            for text in result["samples"]
        )
    # Soma keeps one float32 momentum; SM3 without momentum far less than
    # one float per parameter.
    state_bytes = [float(row["state_bytes_per_parameter"]) for row in rows]
    assert state_bytes[0] == pytest.approx(4.0)
    assert 0.0 < state_bytes[1] < 1.0
    with open(tmp_path / "shakespeare_lm.md") as handle:
        text = handle.read()
    assert "not tiny_shakespeare" in text
    assert "Samples" in text and "```text" in text
    with open(tmp_path / "shakespeare_lm_curves.csv", newline="") as handle:
        curves = list(csv.DictReader(handle))
    steps = [0, example.QUICK["eval_every"], example.QUICK["steps"]]
    assert [int(row["step"]) for row in curves] == steps * len(names)


@only_on_tensorflow_for_time
def test_shakespeare_lm_sweep_quick(common, tmp_path):
    """examples/shakespeare_lm_sweep.py: each optimizer at its default
    learning rate times each factor, then (Soma: it decays by default) the
    best rate with the other decays; the best run of each is in bold."""
    pytest.importorskip("keras_hub", reason="needs the `examples` extra")
    text_arguments = shakespeare_text_arguments()
    sweep = load_example("shakespeare_lm_sweep")
    rows = sweep.main(
        [
            "--quick",
            "--steps",
            "4",
            "--optimizer",
            "soma",
            "sm3-m0",
            "--lr-factors",
            "0.5",
            "2",
            "--wd-factors",
            "4",
            *text_arguments,
            "--output-dir",
            str(tmp_path),
        ]
    )
    lm = sweep.lm
    soma_rate, soma_decay = sweep.default_settings("soma", 4)
    sm3_rate, sm3_decay = sweep.default_settings("sm3-m0", 4)
    assert (soma_rate, soma_decay, sm3_decay) == (pytest.approx(2e-4), 0.5, 0.0)
    settings = [(row["key"], row["learning_rate"], row["weight_decay"]) for row in rows]
    soma_rows = [row for row in rows if row["key"] == "soma"]
    best_rate = min(soma_rows[:2], key=sweep.best_key)["learning_rate"]
    assert settings == [
        ("soma", pytest.approx(1e-4), 0.5),
        ("soma", pytest.approx(4e-4), 0.5),
        ("soma", best_rate, 2.0),
        ("sm3-m0", pytest.approx(0.5 * sm3_rate), 0.0),
        ("sm3-m0", pytest.approx(2 * sm3_rate), 0.0),
    ]
    for row in rows:
        assert math.isfinite(row["val_loss"]) and row["val_loss"] > 0, row
    written = read_outputs(tmp_path, "shakespeare_lm_sweep", "shakespeare_lm_sweep")
    assert len(written) == len(rows)
    bold = [row["optimizer"] for row in written if row["optimizer"].startswith("**")]
    best = sweep.best_rows(rows)
    assert bold == [f"**{best[key]['optimizer']}**" for key in ("soma", "sm3-m0")]
    assert lm.OPTIMIZERS["sm3-m0"][0] in bold[1]


def test_shakespeare_lm_majority_vote(common, tmp_path):
    """`--optimizer soma-vote`: Soma under keras_soma.distribute.majority_vote
    over the 2 host devices tests/conftest.py asks for, with the example's
    evaluation and sampling batches split over the workers."""
    if keras.backend.backend() != "jax":
        pytest.skip("JAX backend only: the majority vote runs under JAX")
    pytest.importorskip("keras_hub", reason="needs the `examples` extra")
    if len(keras.distribution.list_devices()) < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2")
    text_arguments = shakespeare_text_arguments()
    example = load_example("shakespeare_lm")
    (result,) = example.main(
        [
            "--quick",
            "--optimizer",
            "soma-vote",
            "--workers",
            "2",
            "--steps",
            "20",
            "--eval-every",
            "10",
            "--sample-characters",
            "8",
            *text_arguments,
            "--output-dir",
            str(tmp_path),
        ]
    )
    (row,) = read_outputs(tmp_path, "shakespeare_lm", "shakespeare_lm")
    assert row["optimizer"] == "Soma, majority vote (2 workers)"
    assert float(row["val_loss"]) < result["initial_val_loss"], row
    assert float(row["averaged_val_loss"]) < result["initial_val_loss"], row
    # One float32 momentum per worker.
    assert float(row["state_bytes_per_parameter"]) == pytest.approx(8.0)
    # Three samples from a batch padded to a multiple of the workers.
    assert [len(text) for text in result["samples"]] == [8] * example.SAMPLES
    # The distribution is unset afterwards.
    assert keras.distribution.distribution() is None


def test_shakespeare_lm_majority_vote_bad_arguments(common, capsys):
    example = load_example("shakespeare_lm")
    vote = ["--quick", "--optimizer", "soma-vote"]
    if keras.backend.backend() != "jax":
        with pytest.raises(SystemExit):
            example.parse_args(vote)
        assert "--optimizer soma-vote needs the JAX backend" in capsys.readouterr().err
        return
    for arguments, message in [
        (["--workers", "1"], "--workers must be at least 2 (a vote); received 1"),
        (
            ["--workers", "5"],
            "--batch-size must be a multiple of --workers (5) for soma-vote; "
            "received 12",
        ),
        (
            ["--workers", "4", "--eval-windows", "50"],
            "--eval-windows must be a multiple of --workers (4) for soma-vote; "
            "received 50",
        ),
    ]:
        with pytest.raises(SystemExit):
            example.parse_args(vote + arguments)
        assert message in capsys.readouterr().err
    devices = len(keras.distribution.list_devices())
    with pytest.raises(ValueError, match="--workers must be at most the number of"):
        example.vote_distribution(devices + 1)


def test_shakespeare_lm_optimizer_settings(common):
    """`NAME:lr=RATE:wd=DECAY` overrides that optimizer's settings alone,
    ahead of `--learning-rate`/`--weight-decay`, and names them."""
    example = load_example("shakespeare_lm")
    assert example.parse_optimizer("soma") == ("soma", {})
    assert example.parse_optimizer("adamw:wd=0.4:lr=2e-3") == (
        "adamw",
        {"weight_decay": 0.4, "learning_rate": 2e-3},
    )
    args = example.parse_args(
        ["--quick", "--optimizer", "soma:lr=1e-4", "--optimizer", "adamw"]
    )
    assert args.optimizer == ["soma:lr=1e-4", "adamw"]
    name, overrides = example.parse_optimizer(args.optimizer[0])
    optimizer = example.make_optimizer(
        name, args.steps, overrides["learning_rate"], overrides.get("weight_decay")
    )
    assert example.plateau_learning_rate(optimizer) == pytest.approx(1e-4)
    assert optimizer.weight_decay == pytest.approx(0.5)  # Soma's default here


def test_shakespeare_lm_bad_text(common, tmp_path):
    example = load_example("shakespeare_lm")
    quick = ["--quick", "--output-dir", str(tmp_path / "out")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="--text-dir must hold at least one file"):
        example.main(["--text-dir", str(empty), *quick])
    (empty / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="--text-dir must hold some text"):
        example.main(["--text-dir", str(empty), *quick])
    short = tmp_path / "short"
    short.mkdir()
    (short / "play.txt").write_text("To be, or not to be: that is the question.\n" * 4)
    with pytest.raises(ValueError, match="--context must be shorter .* received 64"):
        example.main(["--text-dir", str(short), "--context", "64", *quick])


def test_shakespeare_lm_vocabulary_covers_held_out_text(common):
    # A character that only the held-out tenth holds is still in the
    # vocabulary, so the held-out text encodes.
    example = load_example("shakespeare_lm")
    text = "abc" * 30 + "xyz" * 3
    train, held_out = example.split_text(text)
    assert "z" not in train
    vocabulary = example.CharacterVocabulary(text)
    assert vocabulary.decode(vocabulary.encode(held_out)) == held_out


@pytest.mark.parametrize(
    "example_name, arguments, message",
    [
        (
            "fashion_mnist_mlp",
            ["--epochs", "0"],
            "--epochs must be an integer >= 1; received 0",
        ),
        ("fashion_mnist_mlp", ["--learning-rate", "-1"], "--learning-rate must be > 0"),
        (
            "fashion_mnist_cnn",
            ["--batch-size", "0"],
            "--batch-size must be an integer >= 1",
        ),
        (
            "fashion_mnist_cnn",
            ["--steps-per-epoch", "-3"],
            "--steps-per-epoch must be an integer >= 1",
        ),
        (
            "decay_factor",
            ["--momentums", "0.5", "1.0"],
            "--momentums must each lie in [0, 1); received [1.0]",
        ),
        (
            "decay_factor",
            ["--manual-dir", "/nonexistent/downloads"],
            "--manual-dir must be an existing directory",
        ),
        (
            "decay_factor",
            ["--output-dir", __file__],
            "--output-dir must be a directory",
        ),
        (
            "sm3_polyak_serving",
            ["--warmup-fraction", "0.6", "--cooldown-fraction", "0.5"],
            "--warmup-fraction plus --cooldown-fraction must be at most 1",
        ),
        (
            "sm3_polyak_serving",
            ["--averaging-decay", "1"],
            "--averaging-decay must lie in (0, 1); received 1.0",
        ),
        (
            "sm3_polyak_serving",
            ["--export-dir", os.path.dirname(__file__)],
            "--export-dir must not exist yet",
        ),
        (
            "learning_rate_sweep",
            ["--optimizer", "soma", "--learning-rates", "1e-3", "0"],
            "--learning-rates must all be > 0; received [0.001, 0.0]",
        ),
        (
            "learning_rate_sweep",
            ["--optimizer", "gradsign", "--epochs", "0"],
            "--epochs must be an integer >= 1; received 0",
        ),
        (
            "learning_rate_sweep",
            ["--optimizer", "sm3", "--manual-dir", "/nonexistent/downloads"],
            "--manual-dir must be an existing directory",
        ),
        (
            "seed_repeats",
            ["--seeds", "1"],
            "--seeds must be an integer >= 2 (a spread needs two runs); received 1",
        ),
        (
            "seed_repeats",
            ["--learning-rate", "0"],
            "--learning-rate must be > 0; received 0.0",
        ),
        (
            "learning_rate_sweep",
            ["--optimizer", "gradsign", "--schedule", "linear"],
            "argument --schedule: invalid choice: 'linear'",
        ),
        (
            "shakespeare_lm",
            ["--optimizer", "adamw", "--optimizer", "adamx"],
            "argument --optimizer: invalid choice: 'adamx'",
        ),
        (
            "shakespeare_lm",
            ["--text-dir", "/nonexistent/texts"],
            "--text-dir must be an existing directory; received '/nonexistent/texts'",
        ),
        (
            "shakespeare_lm",
            ["--dim", "30", "--heads", "4"],
            "--dim must be a multiple of --heads (4); received 30",
        ),
        (
            "shakespeare_lm",
            ["--quick", "--steps", "0"],
            "--steps must be an integer >= 1",
        ),
        (
            "shakespeare_lm",
            ["--optimizer", "soma:lr=0"],
            "lr must be a number > 0 in 'soma:lr=0'; received '0'",
        ),
        (
            "shakespeare_lm",
            ["--optimizer", "soma:wd=x"],
            "wd must be a number >= 0 in 'soma:wd=x'; received 'x'",
        ),
        (
            "shakespeare_lm",
            ["--optimizer", "soma:beta=0.9"],
            "invalid setting 'beta=0.9' in 'soma:beta=0.9': use soma:lr=RATE:wd=DECAY",
        ),
        (
            "shakespeare_lm",
            ["--weight-decay", "-0.1"],
            "--weight-decay must be >= 0; received -0.1",
        ),
        (
            "shakespeare_lm_sweep",
            ["--lr-factors", "1", "1"],
            "--lr-factors must hold at least 2 different values (a sweep)",
        ),
        (
            "shakespeare_lm_sweep",
            ["--wd-factors", "0"],
            "--wd-factors must all be > 0; received [0.0]",
        ),
        (
            "shakespeare_lm_sweep",
            ["--optimizer", "soma-vote"],
            "argument --optimizer: invalid choice: 'soma-vote'",
        ),
    ],
)
def test_bad_arguments_are_named(common, example_name, arguments, message, capsys):
    example = load_example(example_name)
    with pytest.raises(SystemExit):
        example.parse_args(arguments)
    assert message in capsys.readouterr().err


def load_benchmark(name: str):
    """Imports `benchmarks/<name>.py` as a module."""
    path = os.path.join(REPOSITORY, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_vote_convergence(arguments, data_dir=None) -> dict[str, list[float]]:
    """Runs benchmarks/vote_convergence.py under JAX; its table's rows by
    seed (and "mean"), as numbers."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    if data_dir is not None:
        env["TFDS_DATA_DIR"] = data_dir
    completed = subprocess.run(
        [
            sys.executable,
            os.path.join(REPOSITORY, "benchmarks", "vote_convergence.py"),
            *arguments,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    output = completed.stdout
    assert "python benchmarks/vote_convergence.py " + shlex.join(arguments) in output
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (cells[0].isdigit() or cells[0] == "mean"):
            rows[cells[0]] = [float(cell) for cell in cells[1:] if cell]
    return rows, output


def test_vote_convergence_short(common, data_dir):
    """benchmarks/vote_convergence.py, short: per seed one single-device
    and one majority-vote run of the CNN; the table's differences are the
    vote's accuracy minus the single device's, and the mean is theirs."""
    if keras.backend.backend() != "jax":
        pytest.skip("JAX backend only: the majority vote runs under JAX")
    # In the order of the command line the benchmark prints.
    arguments = ["--workers", "2", "--epochs", "1", "--seeds", "0", "1"]
    arguments += ["--batch-size", "64", "--model", "cnn", "--steps-per-epoch", "8"]
    rows, output = run_vote_convergence(arguments, data_dir)
    assert "fashion-MNIST CNN, Soma defaults, 1 epochs" in output
    assert set(rows) == {"0", "1", "mean"}, output
    differences = []
    for seed in ("0", "1"):
        single, vote, difference = rows[seed]
        assert 0 < single <= 100 and 0 < vote <= 100, rows[seed]
        assert abs(difference - (vote - single)) <= 0.011, rows[seed]
        differences.append(difference)
    assert abs(rows["mean"][0] - sum(differences) / 2) <= 0.011, rows


def test_vote_convergence_language_model_short(common, tmp_path):
    """`--model lm`: the language model example once on one device and
    once under the vote per seed; the differences are in percent of the
    single device's validation loss, and each seed's outputs are written."""
    if keras.backend.backend() != "jax":
        pytest.skip("JAX backend only: the majority vote runs under JAX")
    pytest.importorskip("keras_hub", reason="needs the `examples` extra")
    text_arguments = shakespeare_text_arguments()
    # In the order of the command line the benchmark prints.
    arguments = ["--workers", "2", "--seeds", "0", "1", "--model", "lm"]
    arguments += ["--steps", "10", *text_arguments, "--quick"]
    arguments += ["--output-dir", str(tmp_path)]
    rows, output = run_vote_convergence(arguments)
    assert "validation loss (nats / character)" in output
    assert set(rows) == {"0", "1", "mean"}, output
    differences = []
    for seed in ("0", "1"):
        single, vote, difference = rows[seed]
        assert 0 < single < 10 and 0 < vote < 10, rows[seed]
        assert abs(difference - 100 * (vote - single) / single) <= 0.011, rows[seed]
        differences.append(difference)
        written = read_outputs(
            tmp_path, f"shakespeare_lm_vote_seed{seed}", "shakespeare_lm"
        )
        assert [row["optimizer"] for row in written] == [
            "Soma",
            "Soma, majority vote (2 workers)",
        ]
        assert float(written[0]["val_loss"]) == pytest.approx(single, abs=1e-4)
    assert abs(rows["mean"][0] - sum(differences) / 2) <= 0.011, rows


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--workers", "1"], "--workers must be at least 2 (a vote); received 1"),
        (
            ["--workers", "4", "--batch-size", "30"],
            "--batch-size must be a multiple of --workers (4); received 30",
        ),
        (["--steps-per-epoch", "0"], "--steps-per-epoch must be an integer >= 1"),
        (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
        (
            ["--model", "lm", "--epochs", "3"],
            "--epochs does not apply to --model lm; received 3",
        ),
        (
            ["--model", "cnn", "--text-dir", "texts"],
            "--text-dir does not apply to --model cnn; received 'texts'",
        ),
        (["--model", "lm", "--steps", "0"], "--steps must be an integer >= 1"),
        (
            ["--model", "mlp", "--output-dir", "out"],
            "--output-dir does not apply to --model mlp; received 'out'",
        ),
    ],
)
def test_vote_convergence_bad_arguments_are_named(arguments, message, capsys):
    benchmark = load_benchmark("vote_convergence")
    with pytest.raises(SystemExit):
        benchmark.parse_arguments(arguments)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--devices", "1"], "--devices must be an integer >= 2; received 1"),
        (["--steps", "0"], "--steps must be an integer >= 1; received 0"),
        (
            ["--rendezvous-timeout", "0"],
            "--rendezvous-timeout must be an integer >= 1; received 0",
        ),
        (["--timeout", "-1"], "--timeout must be > 0; received -1.0"),
        (["--cases", "lion"], "argument --cases: invalid choice: 'lion'"),
    ],
)
def test_host_device_deadlock_bad_arguments_are_named(arguments, message, capsys):
    benchmark = load_benchmark("host_device_deadlock")
    with pytest.raises(SystemExit):
        benchmark.parse_arguments(arguments)
    assert message in capsys.readouterr().err


def test_gradsign_gap_short(common, data_dir, tmp_path):
    """benchmarks/gradsign_gap.py, short: one row per variant in order,
    each with its learning rate and schedule; the float sign average's one
    step is `a = (1 - beta) * sign(g)`, `theta - learning_rate * a`."""
    import numpy as np

    benchmark = load_benchmark("gradsign_gap")
    rows = benchmark.main(
        [
            "--variant",
            "gradsign-cosine",
            "sign-average-8",
            "soma-8",
            *SHORT_RUN,
            "--data-dir",
            data_dir,
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert [row["run"] for row in rows] == [
        "GradSign, cosine",
        "float sign average, beta 0.875",
        "Soma, momentum 0.875",
    ]
    assert [row["schedule"] for row in rows] == ["cosine", "cosine", "constant"]
    assert [row["learning_rate"] for row in rows] == pytest.approx(
        [benchmark.COSINE_RATE, benchmark.COSINE_RATE, 2e-4]
    )
    for row in rows:
        assert 0.0 < row["mean_test_accuracy"] <= 1.0, row
    # The study's optimizer does not stay among the examples' ones.
    assert "study" not in common.OPTIMIZERS
    text = (tmp_path / "gradsign_gap.md").read_text()
    assert "Produced by `python benchmarks/gradsign_gap.py --variant" in text

    variable = keras.Variable(np.array([1.0, -2.0, 3.0, 0.5], "float32"))
    gradient = np.array([0.3, -0.1, 0.0, -4.0], "float32")
    optimizer = benchmark.SignAverage(learning_rate=0.01, beta=0.875)
    optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])
    expected = np.array([1.0, -2.0, 3.0, 0.5]) - 0.01 * 0.125 * np.sign(gradient)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(variable), expected, rtol=1e-6
    )
