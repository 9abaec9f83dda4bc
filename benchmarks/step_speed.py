"""Optimizer step speed: keras_soma against Keras's own optimizers.

What it measures: the time of one `optimizer.apply` over 16M float32
parameters in four 2048 x 2048 matrices (and over the soma paper's CNN
variables, where per-variable overhead dominates), in the configuration
users run and, for comparison, compiled:

* TensorFlow: a `tf.function` with XLA off (what `fit` does with its
  default `jit_compile="auto"` on CPU, under tf.distribute and with op
  determinism) and with XLA on;
* JAX: a `jax.jit` step;
* torch: eager, under `torch.no_grad()` (what `fit` does with its default
  `jit_compile="auto"`, which is eager on torch) and `torch.compile`d (what
  `fit` does with `jit_compile=True`).

An element-wise step is memory-bound. Its floor is the time of a copy
moving the same bytes, measured in the same run: a compiled XLA kernel
(TensorFlow, JAX), or one eager in-place op per tensor (torch), that reads
the variable, the gradient and every state tensor and writes the variable
and the state back. Each row gives ms
per step, parameters per second, bytes moved per parameter, and the ratio
to the floor and to Keras Lion (beta_1 = beta_2, Soma's update), Adam,
Adagrad and SGD measured in the same run. On JAX two more columns come from
XLA itself: the bytes per parameter the compiled step reads and writes by
its own count (`cost_analysis()`; "-" where the step holds a loop, whose
body XLA counts once), and the step's temporaries (`memory_analysis()`).
The targets declared in `TARGETS` are checked at the end.

Run time: about 5-10 minutes on a 2-core CPU (TensorFlow, all rows); on
torch add a few seconds of compilation per row.

    python benchmarks/step_speed.py
    KERAS_BACKEND=jax python benchmarks/step_speed.py
    KERAS_BACKEND=torch python benchmarks/step_speed.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _report  # noqa: E402

import keras_soma  # noqa: E402
from keras_soma._common import numpy_dtype  # noqa: E402

BACKEND = keras.backend.backend()


class Target(NamedTuple):
    """`optimizer` takes at most `bound` times the time of `other` (a row
    of the same table), or of its own floor where `other` is None."""

    optimizer: str
    other: str | None
    bound: float


# The targets the script checks, per backend, in the modes named by
# TARGET_MODES. TensorFlow's and JAX's are the first performance issue's;
# torch's are the "every Keras backend" issue's (in the default fit path,
# and again under torch.compile).
TARGETS = {
    "tensorflow": [
        Target("Soma", "Keras Lion", 0.4),
        Target("Soma", None, 1.25),
        Target("GradSign", "Soma", 0.7),
        Target("SM3 momentum=0", "Keras Adagrad", 0.7),
        Target("SM3 momentum=0.9", "Keras Adagrad", 1.0),
        # The 8-bit state issue's: blockwise int8 costs little time.
        Target("Soma int8 state", "Soma", 1.3),
        Target("Soma int8 state", None, 1.3),
    ],
    "jax": [
        Target("Soma", None, 1.25),
        Target("Soma bf16 state", None, 1.25),
        Target("GradSign", None, 1.25),
        Target("SM3 momentum=0", None, 1.25),
        Target("SM3 momentum=0.9", None, 1.25),
    ],
    "torch": [
        Target("Soma", "Keras Lion", 1.0),
        Target("GradSign", "Soma", 0.8),
        Target("SM3 momentum=0", "Keras Adagrad", 1.0),
    ],
}
# How each backend's rows name their compilation ("off" / "on"), which of
# the two `fit` uses by default, and in which the targets are checked.
COMPILER_LABEL = {"tensorflow": "XLA", "jax": "XLA", "torch": "torch.compile"}
DEFAULT_COMPILED = {"tensorflow": "off", "jax": "on", "torch": "off"}
TARGET_MODES = {"tensorflow": ["off"], "jax": ["on"], "torch": ["off", "on"]}

LARGE_SHAPES = [(2048, 2048)] * 4
# The soma paper's fashion-MNIST CNN: eight variables, 1.2M parameters.
CNN_SHAPES = [
    (3, 3, 1, 32),
    (32,),
    (3, 3, 32, 64),
    (64,),
    (9216, 128),
    (128,),
    (128, 10),
    (10,),
]
BASELINES = ["Keras Lion", "Keras Adam", "Keras Adagrad", "Keras SGD"]


def optimizer_cases():
    cases = [
        ("Soma", lambda: keras_soma.Soma()),
        ("Soma bf16 state", lambda: keras_soma.Soma(momentum_dtype="bfloat16")),
        ("Soma int8 state", lambda: keras_soma.Soma(momentum_dtype="int8")),
        ("GradSign", lambda: keras_soma.GradSign()),
    ]
    if hasattr(keras_soma, "SM3"):
        cases += [
            ("SM3 momentum=0", lambda: keras_soma.SM3(momentum=0.0)),
            ("SM3 momentum=0.9", lambda: keras_soma.SM3(momentum=0.9)),
            (
                "SM3 momentum=0.9 int8",
                lambda: keras_soma.SM3(momentum=0.9, momentum_dtype="int8"),
            ),
            # The whole-tensor form, for comparison with the row-blocked
            # update SM3 uses on CPU (see the SM3 docs page).
            (
                "SM3 momentum=0 blocked=False",
                lambda: keras_soma.SM3(momentum=0.0, blocked=False),
            ),
        ]
    cases += [
        ("Keras Lion", lambda: keras.optimizers.Lion(2e-4, beta_1=0.95, beta_2=0.95)),
        ("Keras Adam", lambda: keras.optimizers.Adam()),
        ("Keras Adagrad", lambda: keras.optimizers.Adagrad()),
        ("Keras SGD", lambda: keras.optimizers.SGD()),
    ]
    return cases


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def nbytes(tensor) -> int:
    dtype = numpy_dtype(keras.backend.standardize_dtype(tensor.dtype))
    return int(np.prod(tensor.shape, dtype=np.int64)) * dtype.itemsize


def time_blocks(function, steps: int) -> float:
    """Milliseconds per call over one block of `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        result = function()
    block_until_ready(result)
    return (time.perf_counter() - start) / steps * 1000.0


def time_interleaved(functions, steps: int, repeats: int):
    """Times every function of `functions` (a dict) in `repeats` rounds;
    each round runs one block of `steps` calls of each function in turn.

    Interleaving puts every function under the same load in each round,
    so that a ratio of two functions, taken per round, is not skewed by
    the load of a shared machine drifting between them. Returns a dict of
    per-round milliseconds per call."""
    for function in functions.values():
        function()
        function()  # compiled and warm
    blocks = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            blocks[name].append(time_blocks(function, steps))
    return blocks


def block_until_ready(result):
    if BACKEND == "jax" and result is not None:
        import jax

        jax.block_until_ready(result)
    elif BACKEND == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def make_problem(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    variables = [
        keras.Variable(
            rng.standard_normal(shape).astype(np.float32).astype(numpy_dtype(dtype)),
            dtype=dtype,
        )
        for shape in shapes
    ]
    gradients = [
        keras.ops.convert_to_tensor(
            rng.standard_normal(shape).astype(np.float32), dtype=dtype
        )
        for shape in shapes
    ]
    return variables, gradients


# --------------------------------------------------------------------------
# Steps and floors, per backend
# --------------------------------------------------------------------------


def tensorflow_step(optimizer, variables, gradients, xla: bool):
    import tensorflow as tf

    @tf.function(jit_compile=xla)
    def step():
        optimizer.apply(gradients, variables)

    return step


def tensorflow_floor(state, variables, gradients):
    """Reads variable, gradient and state; writes variable and state."""
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def copy():
        for variable, gradient in zip(variables, gradients):
            variable.assign(variable + gradient)
        for tensor in state:
            tensor.assign(tensor + tf.ones((), tensor.dtype))

    return copy


def jax_step(optimizer, variables, gradients):
    import jax

    # The arguments come in the order of the results, as in Keras's own
    # JAX trainer: JAX pairs donated buffers with results of the same shape
    # and dtype in order, so (optimizer, variables) -> (variables,
    # optimizer) would pair momentum buffers with variable results and make
    # XLA copy them back every step.
    # The gradients are an argument, not a closed-over constant, so XLA
    # cannot fold functions of them (such as their sign) at compile time.
    def apply(variable_values, optimizer_values, gradient_values):
        return optimizer.stateless_apply(
            optimizer_values, gradient_values, variable_values
        )

    apply = jax.jit(apply, donate_argnums=(0, 1))
    values = {
        "variables": [v.value for v in variables],
        "optimizer": [v.value for v in optimizer.variables],
    }

    def step():
        values["variables"], values["optimizer"] = apply(
            values["variables"], values["optimizer"], gradients
        )
        return values["variables"]

    # XLA's own account of the compiled step's temporaries (everything it
    # allocates besides the arguments and the results, which are donated).
    compiled = apply.lower(
        values["variables"], values["optimizer"], gradients
    ).compile()
    step.temporary_bytes = compiled.memory_analysis().temp_size_in_bytes
    step.compiled_bytes = compiled_bytes_accessed(compiled)
    return step


def compiled_bytes_accessed(compiled):
    """XLA's own estimate of the bytes the compiled step reads and writes
    (`cost_analysis()["bytes accessed"]`), or None where it does not count
    them all: it counts the body of a loop once, not once per iteration."""
    if " while(" in compiled.as_text():
        return None
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device
        analysis = analysis[0]
    return analysis.get("bytes accessed")


def jax_floor(state, variables, gradients):
    import jax
    import jax.numpy as jnp

    def copy(variable_values, state_values, gradient_values):
        return (
            [v + g for v, g in zip(variable_values, gradient_values)],
            [s + jnp.ones((), s.dtype) for s in state_values],
        )

    copy = jax.jit(copy, donate_argnums=(0, 1))
    values = {
        "variables": [jnp.array(v.value) for v in variables],
        "state": [jnp.array(s.value) for s in state],
    }

    def step():
        values["variables"], values["state"] = copy(
            values["variables"], values["state"], gradients
        )
        return values["variables"] + values["state"]

    return step


def torch_compile_each(function):
    """`torch.compile(function)`, with a compile cache of its own.

    torch.compile keeps its compiled versions on a function's code object
    and falls back to running it uncompiled after a few versions
    (`torch._dynamo.config.recompile_limit`); the steps of this script share
    one code object, so each gets a copy, as each model's train function
    does in `fit`."""
    import types

    import torch

    own = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    return torch.compile(own)


def torch_step(optimizer, variables, gradients, compiled: bool):
    """`optimizer.apply` as Keras's torch trainer runs it: under
    `torch.no_grad()`, eagerly or, with `jit_compile=True`, torch.compile'd."""
    import torch

    def step():
        with torch.no_grad():
            optimizer.apply(gradients, variables)

    if not compiled:
        return step
    import torch._dynamo.utils

    step = torch_compile_each(step)
    breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())

    def counted():
        step()
        if not hasattr(counted, "graph_breaks"):
            counted.graph_breaks = (
                sum(torch._dynamo.utils.counters["graph_break"].values())
                - breaks_before
            )

    return counted


def torch_floor(state, variables, gradients):
    """Reads variable, gradient and state; writes variable and state: one
    eager in-place op per tensor, each a single pass over its bytes.

    Eager, not torch.compile'd: Inductor's CPU code may work int8
    arithmetic lane by lane (see "GradSign and SM3 under torch.compile" on
    the performance page), and a compiled floor of int8 state then came
    out above GradSign's eager step on this project's 2-core machine; the
    eager `add_` runs at memory speed for float32 and int8 alike."""
    import torch

    natives = [v.value for v in variables]
    state_natives = [s.value for s in state]

    def copy():
        with torch.no_grad():
            for variable, gradient in zip(natives, gradients):
                variable.add_(gradient)
            for tensor in state_natives:
                tensor.add_(1)

    return copy


def prepare(label, factory, shapes, dtype, compiled):
    """The step and floor functions of one optimizer, and what it moves."""
    variables, gradients = make_problem(shapes, dtype)
    optimizer = factory()
    optimizer.build(variables)
    state = [v for v in optimizer.variables if len(v.shape) > 0]
    parameters = sum(int(np.prod(shape)) for shape in shapes)
    moved = (
        2 * sum(nbytes(v) for v in variables)
        + sum(nbytes(g) for g in gradients)
        + 2 * sum(nbytes(s) for s in state)
    )
    # The floor runs on its own copy of the problem and of the state, so
    # that it does not disturb the optimizer's.
    floor_variables, floor_gradients = make_problem(shapes, dtype, seed=1)
    floor_state = [
        # Not trainable: torch refuses an integer (GradSign's int8) trainable one.
        keras.Variable(
            keras.ops.zeros(s.shape, s.dtype), dtype=s.dtype, trainable=False
        )
        for s in state
    ]
    if BACKEND == "tensorflow":
        step = tensorflow_step(optimizer, variables, gradients, compiled)
        floor = tensorflow_floor(floor_state, floor_variables, floor_gradients)
    elif BACKEND == "jax":
        step = jax_step(optimizer, variables, gradients)
        floor = jax_floor(floor_state, floor_variables, floor_gradients)
    else:
        step = torch_step(optimizer, variables, gradients, compiled)
        floor = torch_floor(floor_state, floor_variables, floor_gradients)
    row = {
        "optimizer": label,
        "backend": BACKEND,
        "dtype": dtype,
        "compiled": "on" if compiled else "off",
        "parameters": parameters,
        "bytes_per_param": moved / parameters,
        "temporary_mib": getattr(step, "temporary_bytes", None),
        "compiled_bytes_per_param": (
            step.compiled_bytes / parameters
            if getattr(step, "compiled_bytes", None)
            else None
        ),
    }
    if row["temporary_mib"] is not None:
        row["temporary_mib"] /= 2**20
    return row, step, floor


def measure_group(cases, shapes, dtype, compiled, steps, repeats):
    """Rows for every optimizer of `cases`, timed interleaved."""
    rows, functions = [], {}
    for label, factory in cases:
        row, step, floor = prepare(label, factory, shapes, dtype, compiled)
        rows.append(row)
        functions[(label, "step")] = step
        functions[(label, "floor")] = floor
    blocks = time_interleaved(functions, steps, repeats)
    for row in rows:
        step = functions[(row["optimizer"], "step")]
        row["graph_breaks"] = getattr(step, "graph_breaks", None)
        row["blocks"] = blocks[(row["optimizer"], "step")]
        row["floor_blocks"] = blocks[(row["optimizer"], "floor")]
        row["ms"] = statistics.median(row["blocks"])
        row["floor_ms"] = statistics.median(row["floor_blocks"])
        row["x_floor"] = _report.median_ratio(row["blocks"], row["floor_blocks"])
        row["params_per_second"] = row["parameters"] / (row["ms"] / 1000.0)
    return rows


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------


def target_results(rows, mode):
    """`(text, measured, bound)` for each target of this backend, on the
    float32 rows of compilation `mode`; targets whose rows were not timed
    (`--only`) are left out."""
    by_name = {
        row["optimizer"]: row
        for row in rows
        if row["dtype"] == "float32" and row["compiled"] == mode
    }
    results = []
    for target in TARGETS[BACKEND]:
        row = by_name.get(target.optimizer)
        if row is None:
            continue
        if target.other is None:
            text = f"{target.optimizer} <= {target.bound} x its floor"
            measured = row["x_floor"]
        elif target.other in by_name:
            text = f"{target.optimizer} <= {target.bound} x {target.other}"
            measured = _report.median_ratio(
                row["blocks"], by_name[target.other]["blocks"]
            )
        else:
            continue
        results.append((text, measured, target.bound))
    return results, by_name


def target_notes(by_name):
    """Context for the targets, from measurements of the same run."""
    notes = []
    if BACKEND == "jax":
        # What XLA compiled the step into, in its own count of bytes (a
        # loop of its own counts once, so none is given for a step with one).
        for target in TARGETS[BACKEND]:
            row = by_name.get(target.optimizer)
            if row is None or row.get("compiled_bytes_per_param") is None:
                continue
            compiled, floor = row["compiled_bytes_per_param"], row["bytes_per_param"]
            notes.append(
                f"{target.optimizer}: the compiled step moves {compiled:.1f} "
                f"bytes / param by XLA's count, its floor {floor:.1f} "
                f"({compiled / floor:.2f} x before any arithmetic)"
            )
    if BACKEND == "torch":
        for name, row in by_name.items():
            if row.get("graph_breaks"):
                notes.append(
                    f"{name}: torch.compile split the step at "
                    f"{row['graph_breaks']} graph breaks"
                )
    if BACKEND != "jax" and "GradSign" in by_name and "Soma" in by_name:
        # The GradSign target is about the ratio of the bytes the two move:
        # the ratio of their floors (copies of those bytes), same rounds.
        floors = _report.median_ratio(
            by_name["GradSign"]["floor_blocks"], by_name["Soma"]["floor_blocks"]
        )
        notes.append(f"GradSign's floor / Soma's floor in the same run: {floors:.2f}")
    return notes


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def step_table(rows) -> str:
    """The Markdown table of `rows`, with ratios to each of BASELINES
    timed with the same dtype and compilation."""
    with_memory = any(row.get("temporary_mib") is not None for row in rows)
    header = [
        "optimizer",
        "backend",
        "dtype",
        COMPILER_LABEL[BACKEND],
        "ms / step",
        "Mparams / s",
        "bytes / param moved",
        "x floor",
        *(f"x {name}" for name in BASELINES),
    ]
    if with_memory:
        header += ["XLA bytes / param", "temporaries MiB"]
    cells = []
    for row in rows:
        key = (row["dtype"], row["compiled"])
        ratios = []
        for name in BASELINES:
            base = next(
                (
                    other
                    for other in rows
                    if other["optimizer"] == name
                    and (other["dtype"], other["compiled"]) == key
                ),
                None,
            )
            ratios.append(
                f"{_report.median_ratio(row['blocks'], base['blocks']):.2f}"
                if base
                else "-"
            )
        line = [
            row["optimizer"],
            row["backend"],
            row["dtype"],
            row["compiled"],
            f"{row['ms']:.2f}",
            f"{row['params_per_second'] / 1e6:.0f}",
            f"{row['bytes_per_param']:.1f}",
            f"{row['x_floor']:.2f}",
            *ratios,
        ]
        if with_memory:
            line += [
                _report.format_optional(row["compiled_bytes_per_param"], ".1f"),
                f"{row['temporary_mib']:.2f}",
            ]
        cells.append(line)
    return _report.markdown_table(header, cells)


def target_heading(mode) -> str:
    if BACKEND != "torch":
        return "Targets (16.8M float32 parameters, default XLA setting):\n"
    if mode == DEFAULT_COMPILED[BACKEND]:
        return (
            "Targets (16.8M float32 parameters, torch.compile off: the default "
            '`fit` path, `jit_compile="auto"` being eager on torch):\n'
        )
    return (
        "Targets (16.8M float32 parameters, torch.compile on: `fit` with "
        "`jit_compile=True`):\n"
    )


def report_targets(report, rows, mode):
    results, by_name = target_results(rows, mode)
    report.emit(target_heading(mode))
    for text, measured, bound in results:
        verdict = "PASS" if measured <= bound else "FAIL"
        report.emit(f"- {verdict}  {text}: measured {measured:.2f}")
    for note in target_notes(by_name):
        report.emit(f"- note  {note}")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed blocks (median taken)"
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--skip-small", action="store_true", help="skip the CNN-variables case"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="NAME",
        help="time only the keras_soma optimizers whose label starts with one of "
        "these (e.g. --only SM3); Keras's optimizers are always timed, as the "
        "baselines",
    )
    parser.add_argument(
        "--no-compiled",
        "--no-xla-on",
        dest="no_compiled",
        action="store_true",
        help="skip the rows compiled where fit() does not compile by default "
        "(XLA on for TensorFlow, torch.compile on for torch)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch only: intra-op threads (torch.set_num_threads); on a "
        "machine shared with other work, 1 keeps an op's threads from "
        "waiting for each other, so that a time counts the step's own work",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="also write the tables and target checks to this Markdown file",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    if args.threads is not None:
        if BACKEND != "torch" or args.threads < 1:
            parser.error("--threads takes an int >= 1, on the torch backend only")
        import torch

        torch.set_num_threads(args.threads)

    if BACKEND == "jax":
        modes = [True]
    else:
        modes = [False] if args.no_compiled else [False, True]
    cases = [
        (label, factory)
        for label, factory in optimizer_cases()
        if label.startswith("Keras")
        or args.only is None
        or label.startswith(tuple(args.only))
    ]
    report = _report.Report()
    command = _report.command_line("benchmarks/step_speed.py", argv)
    report.emit(
        _report.provenance(
            command,
            f"{args.repeats} interleaved rounds of {args.steps} steps, "
            "medians of the times and of the per-round ratios.\n",
        )
    )
    problems = [
        ("16.8M parameters in four 2048 x 2048 matrices", LARGE_SHAPES, args.dtypes)
    ]
    if not args.skip_small:
        problems.append(
            ("the CNN's 8 variables (1.2M parameters)", CNN_SHAPES, ["float32"])
        )
    large_rows = None
    for title, shapes, dtypes in problems:
        rows = []
        for dtype in dtypes:
            for compiled in modes:
                label = f"{COMPILER_LABEL[BACKEND]} {'on' if compiled else 'off'}"
                print(
                    f"  timing {len(cases)} optimizers, {dtype}, {label} ...",
                    flush=True,
                )
                group = measure_group(
                    cases, shapes, dtype, compiled, args.steps, args.repeats
                )
                for row in group:
                    print(
                        f"  {row['optimizer']:18s} {dtype:8s} {label} "
                        f"{row['ms']:8.2f} ms (floor {row['floor_ms']:.2f} ms)",
                        flush=True,
                    )
                rows.extend(group)
        report.emit(f"\n#### {title}\n\n{step_table(rows)}\n")
        if large_rows is None:
            large_rows = rows
    for mode in TARGET_MODES[BACKEND]:
        if any(row["compiled"] == mode for row in large_rows):
            report_targets(report, large_rows, mode)
    report.write(args.output)


if __name__ == "__main__":
    main()
