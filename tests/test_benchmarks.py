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

# The short recommender (12.8M parameters) on every backend: row-sliced
# gradients on TensorFlow, dense ones on JAX and torch. Adam's extra
# moment is 51 MB there, well above the peak's noise. The short CNN
# (1.2M parameters) was too small: Adam's extra 4.8 MB sank in the noise
# (CI measured Adam's peak 5 MB below Soma's on torch and 11 MB below it
# on JAX), where the recommender put Adam 53 MB above Soma on JAX
# (`KERAS_BACKEND=jax python benchmarks/peak_memory.py --short --models
# recommender --optimizers adam soma --sizes`).
MODEL = "recommender"


def test_short_run_measures_and_writes(tmp_path):
    model = MODEL
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
    # The split at the end of the first step: the state is built there and
    # stays resident, so what step 1 leaves beyond SGD's holds the state
    # (the kernel may not show a few pages of it yet); the whole run's peak
    # is the first step's or a later one's.
    for row in (adam, soma):
        left = row["resident_after_first"] - row["resident_before"]
        left_by_sgd = sgd["resident_after_first"] - sgd["resident_before"]
        assert left - left_by_sgd > 0.9 * row["state_bytes"], (row, sgd)
        assert row["retained_beyond_state"] > -0.1 * row["state_bytes"], row
    for row in rows:
        assert row["peak"] == max(row["first_step_peak"], row["steady_peak"]), row
        assert row["steady_peak"] >= row["resident_after_first"] * 0.98, row
        assert "steady_over_sgd_fraction" in row, row
    backend = keras.backend.backend()
    stem = tmp_path / f"peak_memory_{backend}"
    text = (tmp_path / f"peak_memory_{backend}.md").read_text()
    assert "| Soma |" in text and "| Keras Adam |" in text
    assert "The first step and the later ones" in text
    assert f"{model}, Soma, steps after the first: peak above the resident" in text
    assert "Produced by `python benchmarks/peak_memory.py --short" in text
    with open(f"{stem}.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 3
    png = f"{stem}_{model}.png"
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's allocator"
)
def test_tensorflow_allocator_counts_the_state_as_tensors(tmp_path):
    rows = peak_memory.main(
        ["--short", "--models", MODEL, "--optimizers", "soma", "--sizes"]
        + ["--tf-allocator-stats"]
    )
    assert all(row["status"] == "ok" for row in rows), rows
    sgd, soma = rows
    for row in rows:
        # The weights are TensorFlow tensors before fit.
        assert row["tf_tensors_before"] >= row["weight_bytes"], row
        assert row["tf_tensor_peak"] >= row["tf_tensors_after_first"], row
    # Soma's momentum is TensorFlow tensors after the first step: all of
    # it, and no second copy of it (15 MB more was measured at this size).
    beyond = soma["tf_tensors_retained_beyond_state"]
    state = soma["state_bytes"]
    assert -0.02 * state < beyond < 0.5 * state, (beyond, state)
    peak_over_sgd = soma["tf_tensor_peak"] - sgd["tf_tensor_peak"]
    assert peak_over_sgd > 0.9 * soma["state_bytes"], (peak_over_sgd, soma)
    assert "tf_tensor_excess_fraction" in soma


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's allocator"
)
def test_tf_allocator_slack_counts_at_least_the_state(tmp_path):
    """`tf_allocator_slack.py` builds each optimizer's state alone, in a
    process with TensorFlow's BFC allocator: BFC counts at least the
    state's bytes for it, and the table names each optimizer."""
    import tf_allocator_slack

    output = tmp_path / "slack.md"
    results = tf_allocator_slack.main(
        ["--short", "--optimizers", "soma", "gradsign", "--output", str(output)]
    )
    assert set(results) == {"soma", "gradsign"}
    for measured in results.values():
        assert measured["state"] > 0, measured
        assert measured["largest"] <= measured["state"], measured
        assert measured["counted"] >= measured["state"], measured
    # GradSign's int8 counters are a quarter of Soma's float32 average.
    assert results["gradsign"]["state"] * 4 == results["soma"]["state"]
    text = output.read_text()
    assert "| Soma | " in text and "| GradSign | " in text, text
    assert "Produced by `python benchmarks/tf_allocator_slack.py --short" in text


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
        (
            ["--transformer-dims", "384", "768"],
            "--transformer-dims must be at least 3 positive multiples of the 12 "
            "heads (or none); received [384, 768]",
        ),
        (["--transformer-dims", "384", "768", "1000"], "received [384, 768, 1000]"),
        (
            ["--tf-inter-op-threads", "0"],
            "--tf-inter-op-threads must be an integer >= 1; received 0",
        ),
        (
            ["--mmap-threshold", "-1"],
            "--mmap-threshold must be an integer >= 1; received -1",
        ),
        *(
            []
            if keras.backend.backend() == "tensorflow"
            else [
                (
                    ["--tf-allocator-stats"],
                    "--tf-allocator-stats reads TensorFlow's allocator: it needs "
                    "KERAS_BACKEND=tensorflow",
                )
            ]
        ),
    ],
)
def test_bad_arguments_are_named(arguments, message, capsys):
    with pytest.raises(SystemExit):
        peak_memory.parse_args(arguments)
    assert message in capsys.readouterr().err


def _synthetic_sweep(per_param: dict, constant: dict, state: dict) -> dict:
    """Rows as the benchmark records them, with peaks on exact lines."""
    sweep = {}
    for name in per_param:
        for rows in (1000, 2000, 4000):
            parameters = rows * peak_memory.RECOMMENDER_WIDTH
            sweep.setdefault(name, []).append(
                (
                    rows,
                    {
                        "status": "ok",
                        "rows": rows,
                        "parameters": parameters,
                        "state_bytes": state[name] * parameters,
                        "peak": constant[name] + per_param[name] * parameters,
                    },
                )
            )
    return sweep


def test_slope_separates_per_parameter_bytes_from_constant_ones():
    # Soma: its state per parameter and a constant 60 MB more (a compiled
    # kernel's one-off cost) passes; GradSign 0.5 byte / param more than
    # its state fails, whatever the constant.
    sweep = _synthetic_sweep(
        per_param={"sgd": 8.0, "soma": 12.0, "gradsign": 9.5},
        constant={"sgd": 500e6, "soma": 560e6, "gradsign": 500e6},
        state={"sgd": 0.0, "soma": 4.0, "gradsign": 1.0},
    )
    fitted = peak_memory.fit_lines(sweep)
    assert fitted["soma"][0] == pytest.approx(12.0)
    assert fitted["soma"][1] == pytest.approx(560e6)
    lines = peak_memory.slope_target_lines(sweep)
    assert any(line.startswith("- PASS") and "Soma:" in line for line in lines)
    assert any(line.startswith("- FAIL") and "GradSign:" in line for line in lines)
    table = "\n".join(peak_memory.largest_tables(sweep))
    assert "| Soma | 12.00 | 4.00 | +0.00 |" in table
    assert "| +57 |" in table  # (560 - 500) MB in MiB


def test_transformer_slope_is_read_over_widths():
    # The transformer's widths give the slope per parameter, whatever the
    # size variable: SM3 with 1.5 bytes / param above SGD fails, Soma with
    # only a constant (a compiled kernel's) above its state passes.
    sweep = _synthetic_sweep(
        per_param={"sgd": 10.0, "soma": 14.0, "sm3-m0": 11.5},
        constant={"sgd": 900e6, "soma": 1070e6, "sm3-m0": 1400e6},
        state={"sgd": 0.0, "soma": 4.0, "sm3-m0": 0.0},
    )
    table = "\n".join(peak_memory.slope_lines(sweep))
    assert "| Soma | 14.00 | 4.00 | +0.00 | 1020 | +162 |" in table
    assert "| SM3 momentum=0 | 11.50 | 0.00 | +1.50 |" in table
    lines = peak_memory.slope_target_lines(sweep, "transformer")
    assert any(line.startswith("- PASS  transformer slope, Soma:") for line in lines), (
        lines
    )
    assert any(
        line.startswith("- FAIL  transformer slope, SM3 momentum=0:") for line in lines
    ), lines


def test_worker_environment_and_width_are_passed_on():
    args = peak_memory.parse_args(
        ["--tf-inter-op-threads", "1", "--mmap-threshold", "131072"]
    )
    environment = peak_memory.worker_environment(args)
    assert environment["TF_NUM_INTEROP_THREADS"] == "1"
    assert environment["MALLOC_MMAP_THRESHOLD_"] == "131072"
    config = {"model": "transformer", "optimizer": "soma", "rows": 1, "dim": 384}
    assert (
        peak_memory.describe_configuration(config) == "transformer / Soma / width 384"
    )


def test_jax_step_buffers_reads_xla_assignment(tmp_path):
    """`jax_step_buffers.py` compiles Keras's JAX train step and reads
    XLA's buffer sizes: the temporaries grow with the table by the dense
    gradient (4 bytes / param, with SGD as with GradSign, whose int8
    counter is updated in place)."""
    if keras.backend.backend() != "jax":
        pytest.skip("JAX backend only")
    import jax_step_buffers

    output = tmp_path / "buffers.md"
    slopes = jax_step_buffers.main(
        [
            "--rows",
            "2000",
            "4000",
            "--optimizers",
            "sgd",
            "gradsign",
            "--output",
            str(output),
        ]
    )
    assert set(slopes) == {"sgd", "gradsign"}
    for slope in slopes.values():
        assert abs(slope - 4.0) < 0.05, slopes
    text = output.read_text()
    assert "| GradSign | 4,000 |" in text, text
    assert (
        "Produced by `KERAS_BACKEND=jax python benchmarks/jax_step_buffers.py" in text
    )


def test_jax_compile_memory_reads_the_compile_alone(tmp_path):
    """`jax_compile_memory.py` compiles Keras's JAX train step in a fresh
    process per optimizer: the compile raises the peak, what it keeps is
    within its peak, and SGD's row is the baseline of the difference."""
    if keras.backend.backend() != "jax":
        pytest.skip("JAX backend only")
    import jax_compile_memory

    output = tmp_path / "compile.md"
    results = jax_compile_memory.main(
        ["--short", "--optimizers", "sgd", "soma", "--output", str(output)]
    )
    assert set(results) == {"sgd", "soma"}
    for measured in results.values():
        assert measured["compile_peak"] > 0, measured
        assert measured["kept"] <= measured["compile_peak"], measured
        assert measured["temporary"] > 0, measured
    assert results["sgd"]["state"] == 0
    assert results["soma"]["state"] == 4 * results["soma"]["parameters"]
    text = output.read_text()
    assert "| Keras SGD | " in text and "| +0 |" in text, text
    assert "KERAS_BACKEND=jax python benchmarks/jax_compile_memory.py --short" in text


@pytest.mark.parametrize(
    "script, backend, message",
    [
        ("tf_allocator_slack", "tensorflow", "TensorFlow's allocator only"),
        ("jax_compile_memory", "jax", "run with KERAS_BACKEND=jax"),
    ],
)
def test_one_backend_scripts_refuse_the_others(script, backend, message, capsys):
    if keras.backend.backend() == backend:
        pytest.skip("the refusal is for the other backends")
    module = __import__(script)
    with pytest.raises(SystemExit):
        module.parse_args([])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--rows", "1000"], "--rows must be at least 2 distinct integers >= 1"),
        (["--rows", "1000", "0"], "received [1000, 0]"),
    ],
)
def test_jax_step_buffers_bad_arguments_are_named(arguments, message, capsys):
    import jax_step_buffers

    with pytest.raises(SystemExit):
        jax_step_buffers.parse_args(arguments)
    assert message in capsys.readouterr().err


def test_help_shows_whole_first_paragraphs_and_runs_nothing(capsys):
    # A script whose `--help` shows only its docstring's first line cuts a
    # sentence that runs onto the next one.
    import ast
    import glob

    for path in sorted(
        glob.glob(os.path.join(ROOT, "examples", "*.py"))
        + glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
    ):
        with open(path, encoding="utf-8") as file:
            source = file.read()
        if "__doc__.splitlines()[0]" in source:
            first = ast.get_docstring(ast.parse(source)).split("\n\n")[0]
            assert "\n" not in first, f"{path}: --help cuts its description"
    import state_memory

    with pytest.raises(SystemExit) as exited:
        state_memory.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "Optimizer state memory" in out
    assert "| optimizer |" not in out
