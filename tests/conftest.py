"""Shared test setup: quiet TensorFlow, the backend in use, and a clean
Keras state (dtype policy, random seed) around every test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Two host devices for the keras.distribution tests on JAX. XLA reads the
# flag when JAX first sets up its CPU backend, so it is set before anything
# imports JAX; TensorFlow ignores it (its tests split the CPU below).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import keras  # noqa: E402
import pytest  # noqa: E402

# Two logical CPU devices for the tf.distribute tests. They must be set up
# before TensorFlow initializes its devices, so it happens at import; one
# device stays the default everywhere else.
LOGICAL_CPUS = 2
if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * LOGICAL_CPUS
    )


def pytest_collection_finish(session):
    """Refuses a run in which importing a test module switched this
    process's `KERAS_BACKEND`: the subprocesses the tests start inherit the
    environment and would train on another backend than the suite."""
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen is not None and chosen != keras.backend.backend():
        raise pytest.UsageError(
            f"KERAS_BACKEND was set to {chosen!r} while the tests were "
            f"collected, but they run on {keras.backend.backend()!r}: a test "
            "module (or a module it imports) sets the variable at import time"
        )


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def clean_keras_state():
    keras.mixed_precision.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_dtype_policy("float32")
    keras.backend.clear_session()


requires_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow backend only"
)
requires_jax = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="JAX backend only"
)
requires_torch = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="PyTorch backend only"
)
