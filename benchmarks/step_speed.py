"""Optimizer step speed: keras_soma against Keras's own optimizers.

What it measures: the time of one `optimizer.apply` over 16M float32
parameters in four 2048 x 2048 matrices (and over the soma paper's CNN
variables, where per-variable overhead dominates), in the configuration
users run: on TensorFlow a `tf.function` with XLA off (what `fit` does with
its default `jit_compile="auto"` on CPU, under tf.distribute and with op
determinism) and, for comparison, with XLA on; on JAX a `jax.jit` step.

An element-wise step is memory-bound. Its floor is the time of a copy
moving the same bytes, measured in the same run by an XLA kernel that
reads the variable, the gradient and every state tensor and writes the
variable and the state back. Each row gives ms per step, parameters per
second, bytes moved per parameter, and the ratio to the floor and to Keras
Lion (beta_1 = beta_2, Soma's update), Adam, Adagrad and SGD measured in the
same run. On JAX two more columns come from XLA itself: the bytes per
parameter the compiled step reads and writes by its own count
(`cost_analysis()`; "-" where the step holds a loop, whose body XLA counts
once), and the step's temporaries (`memory_analysis()`). The targets of
the performance issue are checked at the end.

Run time: about 5-10 minutes on a 2-core CPU (TensorFlow, all rows).

    python benchmarks/step_speed.py
    KERAS_BACKEND=jax python benchmarks/step_speed.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_soma  # noqa: E402
from keras_soma._reference import numpy_dtype  # noqa: E402

BACKEND = keras.backend.backend()
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


def optimizer_cases():
    cases = [
        ("Soma", lambda: keras_soma.Soma()),
        ("Soma bf16 state", lambda: keras_soma.Soma(momentum_dtype="bfloat16")),
        ("GradSign", lambda: keras_soma.GradSign()),
    ]
    if hasattr(keras_soma, "SM3"):
        cases += [
            ("SM3 momentum=0", lambda: keras_soma.SM3(momentum=0.0)),
            ("SM3 momentum=0.9", lambda: keras_soma.SM3(momentum=0.9)),
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


def median_ratio(blocks, other_blocks) -> float:
    """The median over rounds of the per-round ratio of two timings."""
    return statistics.median(a / b for a, b in zip(blocks, other_blocks))


def block_until_ready(result):
    if BACKEND == "jax" and result is not None:
        import jax

        jax.block_until_ready(result)


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
        return values["variables"]

    return step


def prepare(label, factory, shapes, dtype, xla):
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
        keras.Variable(keras.ops.zeros(s.shape, s.dtype), dtype=s.dtype) for s in state
    ]
    if BACKEND == "tensorflow":
        step = tensorflow_step(optimizer, variables, gradients, xla)
        floor = tensorflow_floor(floor_state, floor_variables, floor_gradients)
    else:
        step = jax_step(optimizer, variables, gradients)
        floor = jax_floor(floor_state, floor_variables, floor_gradients)
    row = {
        "optimizer": label,
        "backend": BACKEND,
        "dtype": dtype,
        "xla": "on" if (xla or BACKEND == "jax") else "off",
        "parameters": parameters,
        "bytes_per_param": moved / parameters,
        "temporary_mib": getattr(step, "temporary_bytes", None),
        "compiled_bytes_per_param": (
            step.compiled_bytes / parameters
            if getattr(step, "compiled_bytes", None)
            else None
        ),
        "largest_mib": max(nbytes(v) for v in variables) / 2**20,
    }
    if row["temporary_mib"] is not None:
        row["temporary_mib"] /= 2**20
    return row, step, floor


def measure_group(cases, shapes, dtype, xla, steps, repeats):
    """Rows for every optimizer of `cases`, timed interleaved."""
    rows, functions = [], {}
    for label, factory in cases:
        row, step, floor = prepare(label, factory, shapes, dtype, xla)
        rows.append(row)
        functions[(label, "step")] = step
        functions[(label, "floor")] = floor
    blocks = time_interleaved(functions, steps, repeats)
    for row in rows:
        row["blocks"] = blocks[(row["optimizer"], "step")]
        row["floor_blocks"] = blocks[(row["optimizer"], "floor")]
        row["ms"] = statistics.median(row["blocks"])
        row["floor_ms"] = statistics.median(row["floor_blocks"])
        row["x_floor"] = median_ratio(row["blocks"], row["floor_blocks"])
        row["params_per_second"] = row["parameters"] / (row["ms"] / 1000.0)
    return rows


def format_rows(rows, baselines):
    with_memory = any(row.get("temporary_mib") is not None for row in rows)
    memory_header = "| XLA bytes / param | temporaries MiB " if with_memory else ""
    header = (
        "| optimizer | backend | dtype | XLA | ms / step | Mparams / s | bytes / param moved "
        "| x floor | "
        + " | ".join(f"x {name}" for name in baselines)
        + " "
        + memory_header
        + "|"
    )
    lines = [header, "|" + "---|" * (8 + len(baselines) + (2 if with_memory else 0))]
    for row in rows:
        key = (row["dtype"], row["xla"])
        ratios = []
        for name in baselines:
            base = next(
                (
                    r
                    for r in rows
                    if r["optimizer"] == name and (r["dtype"], r["xla"]) == key
                ),
                None,
            )
            ratios.append(
                f"{median_ratio(row['blocks'], base['blocks']):.2f}" if base else "-"
            )
        lines.append(
            f"| {row['optimizer']} | {row['backend']} | {row['dtype']} | {row['xla']} | "
            f"{row['ms']:.2f} | {row['params_per_second'] / 1e6:.0f} | {row['bytes_per_param']:.1f} | "
            f"{row['x_floor']:.2f} | "
            + " | ".join(ratios)
            + " |"
            + (
                f" {format_optional(row['compiled_bytes_per_param'], '.1f')} | {row['temporary_mib']:.2f} |"
                if with_memory
                else ""
            )
        )
    return "\n".join(lines)


def format_optional(value, spec):
    return "-" if value is None else format(value, spec)


def check_targets(rows):
    """The performance issue's targets, on the float32 rows with XLA as
    users get it by default (off on TensorFlow, on with JAX)."""
    default_xla = "off" if BACKEND == "tensorflow" else "on"
    by_name = {
        row["optimizer"]: row
        for row in rows
        if row["dtype"] == "float32" and row["xla"] == default_xla
    }
    checks = []

    def ratio(name, other):
        return median_ratio(by_name[name]["blocks"], by_name[other]["blocks"])

    def floor_ratio(name):
        return by_name[name]["x_floor"]

    if BACKEND == "tensorflow":
        targets = [
            ("Soma", "Keras Lion", 0.4),
            ("Soma", None, 1.25),
            ("GradSign", "Soma", 0.7),
            ("SM3 momentum=0", "Keras Adagrad", 0.7),
            ("SM3 momentum=0.9", "Keras Adagrad", 1.0),
        ]
    else:
        targets = [
            (name, None, 1.25)
            for name in by_name
            if not name.startswith("Keras") and "blocked=False" not in name
        ]
    for name, other, bound in targets:
        if name not in by_name or (other is not None and other not in by_name):
            continue  # not timed in this run (--only)
        if other is None:
            checks.append((f"{name} <= {bound} x its floor", floor_ratio(name), bound))
        else:
            checks.append((f"{name} <= {bound} x {other}", ratio(name, other), bound))
    lines = []
    for text, value, bound in checks:
        lines.append(
            f"{'PASS' if value <= bound else 'FAIL'}  {text}: measured {value:.2f}"
        )
    if BACKEND == "jax":
        # Context for the floor targets: what XLA compiled the step into,
        # in its own count of bytes (a loop of its own counts once, so
        # none is given for a step with one).
        for name, other, bound in targets:
            row = by_name.get(name)
            if (
                row is None
                or row.get("compiled_bytes_per_param") is None
                or other is not None
            ):
                continue
            lines.append(
                f"note  {name}: the compiled step moves {row['compiled_bytes_per_param']:.1f} bytes / param "
                f"by XLA's count, its floor {row['bytes_per_param']:.1f} "
                f"({row['compiled_bytes_per_param'] / row['bytes_per_param']:.2f} x before any arithmetic)"
            )
    if BACKEND == "tensorflow" and "GradSign" in by_name and "Soma" in by_name:
        # Context for the GradSign target, which is the ratio of the bytes
        # the two move: the ratio of their floors (copies of those bytes)
        # measured in the same rounds.
        floors = median_ratio(
            by_name["GradSign"]["floor_blocks"], by_name["Soma"]["floor_blocks"]
        )
        lines.append(
            f"note  GradSign's floor / Soma's floor in the same run: {floors:.2f}"
        )
    return lines


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
        help="time only the keras_soma optimizers whose label starts with one of these "
        "(e.g. --only SM3); Keras's optimizers are always timed, as the baselines",
    )
    parser.add_argument(
        "--no-xla-on", action="store_true", help="TensorFlow: skip the XLA-on rows"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="also write the tables and target checks to this Markdown file",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")

    xla_modes = (
        ([False] if args.no_xla_on else [False, True])
        if BACKEND == "tensorflow"
        else [True]
    )
    cases = [
        (label, factory)
        for label, factory in optimizer_cases()
        if label.startswith("Keras")
        or args.only is None
        or label.startswith(tuple(args.only))
    ]
    baselines = ["Keras Lion", "Keras Adam", "Keras Adagrad", "Keras SGD"]
    import platform
    import shlex

    report = []

    def emit(text=""):
        print(text, flush=True)
        report.append(text)

    command = "python " + " ".join(
        shlex.quote(part) for part in ["benchmarks/step_speed.py", *sys.argv[1:]]
    )
    if BACKEND != "tensorflow":
        command = f"KERAS_BACKEND={BACKEND} {command}"
    emit(
        f"Produced by `{command}`: Keras {keras.__version__}, {BACKEND} backend, "
        f"{platform.machine()}, {os.cpu_count()} CPU cores; {args.repeats} interleaved rounds of {args.steps} steps, "
        "medians of the times and of the per-round ratios.\n"
    )
    problems = [
        ("16.8M parameters in four 2048 x 2048 matrices", LARGE_SHAPES, args.dtypes)
    ]
    if not args.skip_small:
        problems.append(
            ("the CNN's 8 variables (1.2M parameters)", CNN_SHAPES, ["float32"])
        )
    all_rows = []
    for title, shapes, dtypes in problems:
        rows = []
        for dtype in dtypes:
            for xla in xla_modes:
                print(
                    f"  timing {len(cases)} optimizers, {dtype}, XLA {'on' if xla else 'off'} ...",
                    flush=True,
                )
                group = measure_group(
                    cases, shapes, dtype, xla, args.steps, args.repeats
                )
                for row in group:
                    print(
                        f"  {row['optimizer']:18s} {dtype:8s} XLA {row['xla']:3s} {row['ms']:8.2f} ms "
                        f"(floor {row['floor_ms']:.2f} ms)",
                        flush=True,
                    )
                rows.extend(group)
        emit(f"\n#### {title}\n\n{format_rows(rows, baselines)}\n")
        all_rows.append(rows)
    emit("Targets (16.8M float32 parameters, default XLA setting):\n")
    for line in check_targets(all_rows[0]):
        emit("- " + line)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
