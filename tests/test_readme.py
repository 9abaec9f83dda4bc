"""The README's two commands stay true: CI runs the same test command, and
the example command names a script that exists. The commands in
CONTRIBUTING.md name files, extras and checks that exist."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path)) as handle:
        return handle.read()


def bash_commands(path):
    """The non-empty lines of the ```bash blocks of a Markdown file."""
    blocks = re.findall(r"```bash\n(.*?)```", read(path), flags=re.S)
    return [
        line.strip() for block in blocks for line in block.splitlines() if line.strip()
    ]


def readme_commands():
    return bash_commands("README.md")


def test_readme_test_command_is_what_ci_runs():
    commands = [c for c in readme_commands() if "pytest" in c]
    assert len(commands) == 1, commands
    pytest_part = commands[0].split('pip install ".[test]" && ', 1)[1]
    for backend in ("tensorflow", "jax", "torch"):
        assert f"KERAS_BACKEND={backend} python -m pytest" in pytest_part, backend
    # CI runs the same command backend by backend (a line each, so that a
    # failure stops the script): the same backends, in the same order.
    readme_backends = re.findall(r"KERAS_BACKEND=(\w+) python -m pytest", pytest_part)
    assert pytest_part == " && ".join(
        f"KERAS_BACKEND={backend} python -m pytest" for backend in readme_backends
    )
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    assert f"for backend in {' '.join(readme_backends)}; do" in ci_lines
    assert "KERAS_BACKEND=$backend python -m pytest" in ci_lines


def test_readme_example_command_names_an_existing_script():
    commands = [c for c in readme_commands() if "examples/" in c]
    assert commands
    for command in commands:
        for script in re.findall(r"examples/\S+\.py", command):
            assert os.path.exists(os.path.join(ROOT, script)), script


def test_readme_speed_figures_are_the_benchmarks_output():
    """The README's speed table, target lines and fit() table are copied
    from the benchmark scripts' own output files, line for line."""
    readme = read("README.md")
    section = readme.split("## Speed", 1)[1].split("\n## ", 1)[0]
    step = read("docs/results/step_speed_tensorflow.md").splitlines()
    fit = read("docs/results/fit_speed.md").splitlines()
    figures = [
        line
        for line in section.splitlines()
        if line.startswith(("| ", "- PASS", "- FAIL", "- note")) and "---" not in line
    ]
    assert len(figures) > 10
    for line in figures:
        assert line in step or line in fit, line


def test_readme_accuracy_figures_are_the_examples_output():
    """The README's accuracy table is the seed-repeats example's own
    output file, line for line, and names the command that wrote it."""
    readme = read("README.md")
    section = readme.split("## Accuracy", 1)[1].split("\n## ", 1)[0]
    output = read("docs/results/seeds_mlp.md")
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(rows) >= 3, rows  # the header and at least two optimizers
    for line in rows:
        assert line in output.splitlines(), line
    command = output.split("Produced by `", 1)[1].split("`", 1)[0]
    assert f"`{command}`" in section


def test_contributing_commands_name_what_exists():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")

    commands = bash_commands("CONTRIBUTING.md")
    assert commands
    extras = set(
        tomllib.loads(read("pyproject.toml"))["project"]["optional-dependencies"]
    )
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    checked = 0
    for command in commands:
        for part in (part.strip() for part in command.split("&&")):
            for named in re.findall(r"\.\[([a-z,]+)\]", part):
                assert set(named.split(",")) <= extras, part
                checked += 1
            for path in re.findall(r"(?:tests|benchmarks|examples)/\S+\.py", part):
                assert os.path.exists(os.path.join(ROOT, path)), path
                checked += 1
            if part.startswith("ruff "):
                # The lint commands are the ones CI runs.
                assert part in ci_lines, part
                checked += 1
            if part.startswith("mkdocs "):
                assert os.path.exists(os.path.join(ROOT, "mkdocs.yml"))
                checked += 1
            selected = re.search(r"-k (\w+)", part)
            if selected and "test_contract.py" in part:
                # The example selects an optimizer the contract suite runs.
                from registry import REGISTRY

                assert selected.group(1) in REGISTRY, part
                checked += 1
    assert checked >= 6, commands


def test_readme_language_model_figures_are_the_examples_output():
    """The README's language-model table is the example's own output file,
    line for line, and names the command that wrote it."""
    readme = read("README.md")
    section = readme.split("## A transformer language model", 1)[1].split("\n## ")[0]
    output = read("docs/results/shakespeare_lm.md")
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(rows) >= 4, rows
    for line in rows:
        assert line in output.splitlines(), line
    command = output.split("Produced by `", 1)[1].split("`", 1)[0]
    assert f"`{command}`" in section
