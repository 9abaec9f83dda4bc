"""Reporting shared by the benchmark scripts: Markdown tables, the line that
says which command produced them, ratios of interleaved timings, and
writing a report both to the terminal and to a Markdown file, and running
a measurement in a fresh process.

Nothing here measures anything itself.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence

import keras

# How a worker process's result line starts (`run_fresh`, `print_result`).
RESULT_PREFIX = "RESULT "


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the header, the `|---|` line, one line per row."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_optional(value, spec: str) -> str:
    """`value` formatted with `spec`, or "-" for None."""
    return "-" if value is None else format(value, spec)


def median_ratio(blocks: Sequence[float], other_blocks: Sequence[float]) -> float:
    """The median over rounds of the per-round ratio of two timings."""
    return statistics.median(a / b for a, b in zip(blocks, other_blocks))


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that runs `script` (a path from the repository root)
    with `argv` (default: this process's arguments), with the Keras backend
    named where it is not TensorFlow."""
    argv = sys.argv[1:] if argv is None else argv
    command = "python " + " ".join(shlex.quote(part) for part in [script, *argv])
    backend = keras.backend.backend()
    if backend != "tensorflow":
        command = f"KERAS_BACKEND={backend} {command}"
    return command


def provenance(command: str, method: str) -> str:
    """ "Produced by `command`: versions, machine; `method`." """
    return (
        f"Produced by `{command}`: Keras {keras.__version__}, "
        f"{keras.backend.backend()} backend, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores; {method}"
    )


class Report:
    """Text printed as it is produced and kept for a Markdown file."""

    def __init__(self):
        self.lines = []

    def emit(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def write(self, path: str | None) -> None:
        """Writes everything emitted to `path` (nothing if it is None)."""
        if path:
            with open(path, "w") as handle:
                handle.write("\n".join(self.lines) + "\n")


def run_fresh(script: str, config: dict, environment=None) -> dict:
    """Runs `script --worker CONFIG` (`config` as JSON) in a fresh Python
    process, with `environment` (default: this one's), and returns the
    dict its worker printed with `print_result`; a worker that printed
    none raises, with the last line of its error output."""
    environment = dict(os.environ if environment is None else environment)
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(config)],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    lines = (result.stderr or "").strip().splitlines() or ["no output"]
    raise RuntimeError(
        f"{os.path.basename(script)} worker {config} failed "
        f"(exit {result.returncode}): {lines[-1][:300]}"
    )


def print_result(result: dict) -> None:
    """Prints a worker's `result` for `run_fresh` to read."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
