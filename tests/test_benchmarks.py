"""The peak-memory benchmark in its short mode, and its argument checks.

Memory figures are not asserted against targets here (a test asserts what
could fail for a bug, not the state of the art); what is asserted is that
the measurement is sane: the peak grows with the state, the state bytes
are the optimizer's, a configuration that cannot fit is reported instead
of crashing the run, and the outputs are written.
"""

from __future__ import annotations

import csv
import os
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import peak_memory  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="reads /proc (Linux only)"
    ),
]

# One model per backend keeps the run short: the recommender exercises the
# row-sliced gradients TensorFlow gives an Embedding, the CNN dense ones.
MODEL_BY_BACKEND = {"tensorflow": "recommender", "jax": "cnn", "torch": "cnn"}


def test_short_run_measures_and_writes(tmp_path):
    model = MODEL_BY_BACKEND[keras.backend.backend()]
    rows = peak_memory.main(
        [
            "--short",
            "--models",
            model,
            "--optimizers",
            "adam",
            "soma",
            "--sizes",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert [row["optimizer"] for row in rows] == ["sgd", "adam", "soma"]
    assert all(row["status"] == "ok" for row in rows), rows
    sgd, adam, soma = rows
    for row in rows:
        assert row["steps"] >= 4, row
        assert row["resident_before"] > row["weight_bytes"] > 0, row
        assert row["peak_above"] > 0, row
    # The state is what the optimizer holds: none for SGD, two float32
    # moments for Adam, one for Soma.
    assert sgd["state_bytes"] == 0
    assert adam["state_bytes"] == 2 * adam["weight_bytes"]
    assert soma["state_bytes"] == soma["weight_bytes"]
    # Adam's extra moment shows in the peak.
    assert adam["peak"] > soma["peak"], (adam["peak"], soma["peak"])
    backend = keras.backend.backend()
    stem = tmp_path / f"peak_memory_{backend}"
    text = (tmp_path / f"peak_memory_{backend}.md").read_text()
    assert "| Soma |" in text and "| Keras Adam |" in text
    assert "Produced by `python benchmarks/peak_memory.py --short" in text
    with open(f"{stem}.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 3
    png = f"{stem}_{model}.png"
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_configuration_that_cannot_fit_is_reported():
    config = {
        "model": "recommender",
        "optimizer": "sgd",
        # 2 * 10^9 rows (int32 ids still reach them) x 64 float32: 512 GB
        # of weights.
        "rows": 2 * 10**9,
        "size": peak_memory.SHORT,
    }
    result = peak_memory.run_configuration(config, timeout=600)
    assert list(result) == ["status"], result
    assert result["status"].startswith("out of memory ("), result
    assert "2,000,000,000 rows" in peak_memory.describe_configuration(config)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--rows", "0"], "--rows must be an integer >= 1; received 0"),
        (["--sizes", "10", "20"], "--sizes must be at least 3 integers >= 1"),
        (["--sizes", "10", "20", "0"], "received [10, 20, 0]"),
        (["--timeout", "0"], "--timeout must be > 0; received 0.0"),
    ],
)
def test_bad_arguments_are_named(arguments, message, capsys):
    with pytest.raises(SystemExit):
        peak_memory.parse_args(arguments)
    assert message in capsys.readouterr().err
