"""Majority-vote Soma (`keras_soma.distribute.majority_vote`) on JAX.

* Exactness: `majority_vote_run.py` trains a linear model with `fit` over
  2, 3 and 4 host devices (a process of its own: XLA reads the device
  count when JAX starts); the test simulates the same workers in numpy
  (`_reference.majority_vote_soma_step`, with the per-worker gradients of
  the mean squared error written out by hand) and asserts that every
  step's majority is the same integer and that the weights and every
  worker's momentum agree to float rounding; with weight decay, a
  learning-rate schedule and `skip_nonfinite` (a NaN on one worker skips
  the step everywhere); a saved model loads every worker's momentum.
* Two processes x two host devices (`majority_vote_processes.py`,
  `keras.distribution.initialize` over loopback, gloo) train exactly as
  one process over four devices.
* Traffic: the compiled step's collectives (benchmarks/vote_traffic.py).
* Bad input: an optimizer without a sign of momentum, no DataParallel
  distribution, options the vote does not support, another backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import LOGICAL_CPUS, requires_jax, requires_tensorflow
from helpers import free_local_ports, run_processes

import keras_soma
from keras_soma._reference import apply_weight_decay, majority_vote_soma_step

TESTS_DIRECTORY = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(TESTS_DIRECTORY)
sys.path.insert(0, TESTS_DIRECTORY)
sys.path.insert(0, os.path.join(REPOSITORY, "benchmarks"))
import majority_vote_run as run  # noqa: E402
from vote_traffic import host_device_flags  # noqa: E402

# WORKERS,EXCHANGE,WEIGHT_DECAY,NAN_STEP (see majority_vote_run.py); 2 and
# 4 workers can tie, 3 cannot; step 5 holds a NaN on the first worker.
CASES = [
    "2,packed,none,none",
    "3,packed,0.1,none",
    "4,packed,none,none",
    "2,int8,0.1,none",
    "3,int8,none,none",
    "4,int8,none,none",
    "4,packed,0.1,5",
    "3,packed,0.1,none,schedule",
]
RUN_TIMEOUT_SECONDS = 540


@pytest.fixture(scope="module")
def vote_runs(tmp_path_factory):
    """One process trains every case of CASES; returns its output folder."""
    if keras.backend.backend() != "jax":
        pytest.skip("JAX backend only")
    output = tmp_path_factory.mktemp("vote")
    environment = {
        **os.environ,
        "PYTHONPATH": REPOSITORY,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": host_device_flags(4),
    }
    completed = subprocess.run(
        [sys.executable, os.path.join(TESTS_DIRECTORY, "majority_vote_run.py")]
        + [str(output)]
        + CASES,
        env=environment,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return output


def worker_gradients(kernel, bias, inputs, targets, workers):
    """Each worker's gradient of Keras's mean squared error of `x @ kernel
    + bias` on its shard (in float64, then float32)."""
    kernel_gradients, bias_gradients = [], []
    for shard_inputs, shard_targets in zip(
        np.split(inputs.astype(np.float64), workers),
        np.split(targets.astype(np.float64), workers),
    ):
        error = shard_inputs @ kernel + bias - shard_targets
        scale = 2.0 / error.size
        kernel_gradients.append(scale * shard_inputs.T @ error)
        bias_gradients.append(scale * error.sum(axis=0))
    return (
        np.stack(kernel_gradients).astype(np.float32),
        np.stack(bias_gradients).astype(np.float32),
    )


@pytest.mark.slow
@requires_jax
@pytest.mark.parametrize("case", CASES)
def test_majority_vote_equals_numpy_workers(vote_runs, case):
    assert_matches_reference(np.load(os.path.join(vote_runs, f"{case}.npz")), case)


def assert_matches_reference(result, case):
    """`result` (a majority_vote_run.py output) is what the numpy workers
    of `case` do, step by step."""
    arguments = run.parse_case(case)
    workers, weight_decay = arguments["workers"], arguments["weight_decay"]
    skip_nonfinite = arguments["nan_step"] is not None
    schedule = arguments["schedule"]
    assert result["iterations"] == run.STEPS
    # Every device holds its own worker's momenta only.
    assert all("batch" in spec for spec in result["shardings"]), result["shardings"]
    inputs, targets = result["inputs"], result["targets"]
    kernel, bias = result["kernel_0"], result["bias_0"]
    kernel_momenta = np.zeros((workers, *kernel.shape), np.float32)
    bias_momenta = np.zeros((workers, *bias.shape), np.float32)
    previous = (kernel, bias)
    ties = skipped = 0
    for step in range(run.STEPS):
        batch = slice(step * run.GLOBAL_BATCH, (step + 1) * run.GLOBAL_BATCH)
        kernel_gradients, bias_gradients = worker_gradients(
            kernel, bias, inputs[batch], targets[batch], workers
        )
        finite = (
            np.isfinite(kernel_gradients).all() and np.isfinite(bias_gradients).all()
        )
        skipped += int(not finite)
        rate = run.learning_rate(step, schedule)
        hyper = {
            "learning_rate": rate,
            "weight_decay": weight_decay,
            "momentum": run.MOMENTUM,
            "skip_nonfinite": skip_nonfinite,
        }
        kernel, kernel_momenta, kernel_tally = majority_vote_soma_step(
            kernel, kernel_gradients, kernel_momenta, **hyper
        )
        bias, bias_momenta, bias_tally = majority_vote_soma_step(
            bias, bias_gradients, bias_momenta, **hyper
        )
        actual = (result["kernels"][step], result["biases"][step])
        for name, tally, before, after in zip(
            ("kernel", "bias"), (kernel_tally, bias_tally), previous, actual
        ):
            ties += int(np.sum(tally == 0))
            # The move the distributed run made, as an integer majority.
            decayed = apply_weight_decay(before, rate, weight_decay)
            moved = np.rint((decayed - after) / rate)
            expected = np.sign(tally) if finite or not skip_nonfinite else 0 * tally
            if not finite and skip_nonfinite:
                moved = np.rint((before - after) / rate)
            np.testing.assert_array_equal(
                moved.astype(np.int32), expected, err_msg=f"{name} step {step}"
            )
        np.testing.assert_allclose(actual[0], kernel, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(actual[1], bias, rtol=1e-5, atol=1e-6)
        previous = actual
    np.testing.assert_allclose(
        result["kernel_momenta"], kernel_momenta, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        result["bias_momenta"], bias_momenta, rtol=1e-4, atol=1e-6
    )
    # Saved and loaded exactly (a .keras file, through `load_weights`; the
    # multi-process run does not save).
    for name in ("kernel_momenta", "bias_momenta"):
        np.testing.assert_array_equal(result[f"restored_{name}"], result[name])
    assert result["restored_iterations"] == run.STEPS
    if skip_nonfinite:
        assert skipped == 1 and result["skipped"] == 1
    # The workers' momenta differ: each follows its own shard.
    assert not np.allclose(result["kernel_momenta"][0], result["kernel_momenta"][1])
    if workers % 2 == 0:
        assert ties > 0, "the even-worker cases should exercise a tie"


MULTI_PROCESS_CASE = "4,packed,none,none"
MULTI_PROCESS_TIMEOUT_SECONDS = 300


@pytest.mark.slow
@requires_jax
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="gloo CPU collectives (Linux)"
)
def test_two_processes_equal_one_process(vote_runs, tmp_path):
    """2 processes x 2 host devices on localhost (keras.distribution
    .initialize, gloo) train as one process over 4 devices does."""
    (port,) = free_local_ports(1)
    output = str(tmp_path / "processes.npz")
    environment = {**os.environ, "PYTHONPATH": REPOSITORY}
    environment.pop("XLA_FLAGS", None)
    script = os.path.join(TESTS_DIRECTORY, "majority_vote_processes.py")
    run_processes(
        [
            [sys.executable, script, str(index), str(port), output, MULTI_PROCESS_CASE]
            for index in range(2)
        ],
        environment,
        [tmp_path / f"process_{index}.log" for index in range(2)],
        MULTI_PROCESS_TIMEOUT_SECONDS,
    )
    result = np.load(output)
    other = np.load(output + ".process1.npz")
    assert_matches_reference(result, MULTI_PROCESS_CASE)
    single = np.load(os.path.join(vote_runs, f"{MULTI_PROCESS_CASE}.npz"))
    for name in ("kernels", "biases", "kernel_momenta", "bias_momenta"):
        np.testing.assert_allclose(result[name], single[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(other[name], result[name])


RESUME_TIMEOUT_SECONDS = 200
KILL_STEP = 6  # within the second epoch: the first epoch's backup is made


def vote_resume_commands(port, directory, kill_step=None):
    script = os.path.join(TESTS_DIRECTORY, "vote_resume_processes.py")
    extra = [] if kill_step is None else [str(kill_step)]
    return [
        [sys.executable, script, str(index), str(port), str(directory), *extra]
        for index in range(2)
    ]


def run_vote_resume(directory, environment, log_name):
    """Both processes of `vote_resume_processes.py` in `directory`, to the
    end (asserting that both end with 0)."""
    (port,) = free_local_ports(1)
    run_processes(
        vote_resume_commands(port, directory),
        environment,
        [directory / f"{log_name}_{index}.log" for index in range(2)],
        RESUME_TIMEOUT_SECONDS,
    )


@pytest.mark.slow
@requires_jax
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="gloo CPU collectives (Linux)"
)
def test_kill_9_of_one_process_fails_the_other_and_a_restart_resumes_exactly(
    tmp_path,
):
    """Two processes train majority-vote Soma with BackupAndRestore (one
    folder per process, a backup per epoch). One is killed with SIGKILL in
    the second epoch: the other is not left waiting on its collectives
    but ends with an error on its own (JAX's distributed service notices
    the missing peer), and writes nothing. Both restarted resume from the
    first epoch's backup, train the 8 steps left, and end with the
    weights and every worker's momentum of an uninterrupted run, bit for
    bit."""
    import vote_resume_processes as worker

    environment = {**os.environ, "PYTHONPATH": REPOSITORY}
    environment.pop("XLA_FLAGS", None)
    reference, cut = tmp_path / "reference", tmp_path / "cut"
    reference.mkdir()
    cut.mkdir()
    run_vote_resume(reference, environment, "process")
    (port,) = free_local_ports(1)
    logs = [cut / f"cut_{index}.log" for index in range(2)]
    processes = []
    try:
        for command, log_path in zip(vote_resume_commands(port, cut, KILL_STEP), logs):
            with open(log_path, "w") as log:
                processes.append(
                    subprocess.Popen(
                        command, env=environment, stdout=log, stderr=subprocess.STDOUT
                    )
                )
        for process in processes:
            process.wait(timeout=RESUME_TIMEOUT_SECONDS)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    survivor_log = logs[0].read_text()
    assert processes[1].returncode == -signal.SIGKILL, logs[1].read_text()[-2000:]
    assert processes[0].returncode != 0, survivor_log[-2000:]
    # It ended on the peer's death, not on its own watchdog.
    assert "Timeout (" not in survivor_log, survivor_log[-2000:]
    assert not (cut / "final.npz").exists()
    run_vote_resume(cut, environment, "resume")
    uninterrupted = np.load(reference / "final.npz")
    resumed = np.load(cut / "final.npz")
    total = worker.EPOCHS * worker.STEPS_PER_EPOCH
    assert int(uninterrupted["steps_run"]) == total
    assert int(resumed["steps_run"]) == total - worker.STEPS_PER_EPOCH
    names = [name for name in uninterrupted.files if name != "steps_run"]
    assert len(names) == 6, names  # kernel, bias; iterations, rate, 2 momenta
    for name in names:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], name)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def compiled_model(optimizer):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def data_parallel():
    return keras.distribution.DataParallel(
        devices=keras.distribution.list_devices("cpu")
    )


@pytest.mark.skipif(
    keras.backend.backend() == "jax", reason="the refusal of other backends"
)
def test_other_backends_are_refused():
    model = compiled_model(keras_soma.Soma())
    with pytest.raises(ValueError, match="needs the JAX backend"):
        keras_soma.distribute.majority_vote(model)
    with pytest.raises(ValueError, match="wait_for_each_step is for the JAX backend"):
        keras_soma.distribute.wait_for_each_step(model)
    # Refused before touching the model: Keras's own hooks stay.
    assert "make_train_function" not in vars(model)
    assert "train_step" not in vars(model)


@requires_jax
@pytest.mark.parametrize("optimizer_class", [keras_soma.SM3, keras_soma.GradSign])
def test_optimizers_without_sign_of_momentum_are_refused(optimizer_class):
    with data_parallel().scope():
        model = compiled_model(optimizer_class())
        with pytest.raises(ValueError, match=optimizer_class.__name__):
            keras_soma.distribute.majority_vote(model)


@requires_jax
def test_no_data_parallel_distribution_is_refused():
    model = compiled_model(keras_soma.Soma())
    with pytest.raises(ValueError, match="DataParallel.*received: distribution=None"):
        keras_soma.distribute.majority_vote(model)
    devices = keras.distribution.list_devices("cpu")
    mesh = keras.distribution.DeviceMesh((1, len(devices)), ["batch", "model"], devices)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )
    with model_parallel.scope():
        model = compiled_model(keras_soma.Soma())
        with pytest.raises(ValueError, match="DataParallel.*ModelParallel"):
            keras_soma.distribute.majority_vote(model)


@requires_jax
@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
        ({"use_ema": True}, "use_ema=True"),
        ({"clipnorm": 1.0}, "clipnorm=1.0"),
        ({"lazy_sparse_updates": True}, "lazy_sparse_updates=True"),
        ({"momentum_dtype": "int8"}, "momentum_dtype='int8'"),
    ],
)
def test_unsupported_options_are_refused(arguments, message):
    with data_parallel().scope():
        model = compiled_model(keras_soma.Soma(**arguments))
        with pytest.raises(ValueError, match=message):
            keras_soma.distribute.majority_vote(model)


@requires_jax
def test_bad_exchange_and_built_optimizer_are_refused():
    with data_parallel().scope():
        model = compiled_model(keras_soma.Soma())
        with pytest.raises(ValueError, match="exchange='float'"):
            keras_soma.distribute.majority_vote(model, exchange="float")
        model.optimizer.build(model.trainable_variables)
        with pytest.raises(ValueError, match="already built"):
            keras_soma.distribute.majority_vote(model)


@requires_jax
def test_trit_packing_round_trips():
    import jax.numpy as jnp

    from keras_soma.distribute import _pack_trits, _unpack_trits

    rng = np.random.default_rng(0)
    trits = rng.integers(0, 3, size=(3, 40))
    packed = _pack_trits(jnp.asarray(trits))
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 8)
    np.testing.assert_array_equal(np.asarray(_unpack_trits(packed)), trits)


def benchmark_table_rows(script, *arguments):
    """The cells of every Markdown table row that benchmarks/`script`
    prints, run on JAX in a process of its own (with `arguments`)."""
    environment = {**os.environ, "PYTHONPATH": REPOSITORY, "KERAS_BACKEND": "jax"}
    completed = subprocess.run(
        [sys.executable, os.path.join(REPOSITORY, "benchmarks", script), *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in completed.stdout.splitlines()
        if line.startswith("|")
    ]


@pytest.mark.slow
@requires_jax
def test_vote_traffic_from_the_compiled_step_is_a_sixteenth_of_float32():
    """benchmarks/vote_traffic.py reads the collectives out of the compiled
    HLO: the packed vote sends at most 1/16 of what the float32 all-reduce
    of DataParallel sends, the int8 vote about 1/4."""
    ratios = {}
    for cells in benchmark_table_rows(
        "vote_traffic.py", "--workers", "4", "--hidden", "64"
    ):
        if len(cells) == 6 and cells[5].startswith("1/"):
            ratios[cells[0]] = (cells[2], float(cells[5][2:]))
    assert set(ratios) == {"DataParallel (float32)", "int8", "packed"}, ratios
    assert "all-reduce" in ratios["DataParallel (float32)"][0]
    assert "all-to-all" in ratios["packed"][0] and "all-gather" in ratios["packed"][0]
    assert ratios["packed"][1] >= 16, ratios
    assert 3.5 <= ratios["int8"][1] <= 4.0 + 1e-9, ratios


@pytest.mark.slow
@requires_jax
def test_fit_over_four_host_devices_waits_for_each_step_and_finishes():
    """benchmarks/host_device_deadlock.py: 1000 steps of `fit(verbose=0)`
    over 4 host devices deadlock XLA's CPU collectives when Keras
    dispatches steps ahead (Keras's Adam under DataParallel does; see the
    script). The vote, and Keras's Adam with `wait_for_each_step`, wait for
    each step through the JAX trainer's `make_train_function` /
    `train_function` and finish; if Keras stops building its step through
    these hooks, "waited for each step" reads "no" and this fails."""
    outcomes = {}
    rows = benchmark_table_rows(
        "host_device_deadlock.py",
        "--cases",
        "vote",
        "keras-adam-waiting",
        "--timeout",
        "300",
        # A loaded machine can keep a device thread 40 s late (XLA's
        # default); a deadlock then shows as no progress in 300 s.
        "--rendezvous-timeout",
        "1200",
    )
    for cells in rows:
        if len(cells) == 3 and cells[0] in ("vote", "keras-adam-waiting"):
            outcomes[cells[0]] = cells[1]
    assert set(outcomes) == {"vote", "keras-adam-waiting"}, rows
    for case, outcome in outcomes.items():
        assert outcome.startswith("finished: 1000 steps"), (case, outcome)
        assert outcome.endswith("waited for each step: yes"), (case, outcome)
        loss = float(outcome.split("loss ")[1].split(",")[0])
        assert np.isfinite(loss), (case, outcome)


@requires_tensorflow
def test_tensorflow_per_replica_momenta_cannot_be_read_for_a_checkpoint():
    """What stands in the way of the vote under tf.distribute
    (docs/scaling.md): per-worker momenta would be SyncOnRead variables
    without aggregation, which each replica writes for itself, but which
    TensorFlow cannot read outside a replica (as `.keras` saving,
    `get_weights` and BackupAndRestore do). If this starts to pass without
    the error, TensorFlow has changed: revisit the vote on TensorFlow."""
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{index}" for index in range(LOGICAL_CPUS)],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
    with strategy.scope():
        momentum = tf.Variable(
            np.zeros(3, "float32"),
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.NONE,
        )

    def step():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        momentum.assign(tf.fill((3,), tf.cast(replica + 1, "float32")))

    strategy.run(tf.function(step))
    local = strategy.experimental_local_results(momentum)
    np.testing.assert_array_equal(
        np.stack([value.numpy() for value in local]),
        np.repeat(np.arange(1, LOGICAL_CPUS + 1, dtype="float32")[:, None], 3, 1),
    )
    with pytest.raises(ValueError, match="VariableAggregation"):
        momentum.numpy()
