"""Plain numpy versions of every keras_soma update: the single source of the
math that the tests compare the Keras implementations against.

Each optimizer has two functions with the same slot names as
`optimizer.get_slots(variable)`:

* `<name>_init(variable, **hyperparameters) -> dict[str, np.ndarray]`
  (hyperparameters that do not shape the state are accepted and ignored,
  so that one dict of constructor arguments serves both functions)
* `<name>_step(variable, gradient, state, learning_rate,
  weight_decay=None, **hyperparameters) -> (new_variable, new_state)`

They are written to be obviously right, not fast, and they reproduce the
dtype rules of the Keras code: the learning rate (a float32 in Keras) is
cast to the variable's dtype; anything computed "in float32" here is
computed in float32 there. `bfloat16` comes from `ml_dtypes`, which both
TensorFlow and JAX depend on.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

try:  # bfloat16 for numpy; installed with TensorFlow and with JAX.
    import ml_dtypes

    _EXTRA_DTYPES = {"bfloat16": ml_dtypes.bfloat16}
except ImportError:  # pragma: no cover - only without both backends
    _EXTRA_DTYPES = {}

State = Dict[str, np.ndarray]


def numpy_dtype(name) -> np.dtype:
    """The numpy dtype for a Keras dtype name (bfloat16 included)."""
    name = str(name)
    if name in _EXTRA_DTYPES:
        return np.dtype(_EXTRA_DTYPES[name])
    return np.dtype(name)


def _cast_learning_rate(learning_rate, dtype) -> np.ndarray:
    return np.asarray(np.float32(learning_rate)).astype(dtype)


def apply_weight_decay(variable, learning_rate, weight_decay: Optional[float]):
    """Keras's decoupled weight decay: theta - theta * wd * lr."""
    if weight_decay is None:
        return variable
    dtype = variable.dtype
    decay = np.asarray(np.float32(weight_decay)).astype(dtype)
    rate = _cast_learning_rate(learning_rate, dtype)
    return (variable - (variable * decay) * rate).astype(dtype)


def sign_with_zero(values: np.ndarray) -> np.ndarray:
    """sign(x) with sign(0) = 0 and sign(NaN) = 0, as an int array."""
    return (values > 0).astype(np.int32) - (values < 0).astype(np.int32)


# ---------------------------------------------------------------------------
# Soma
# ---------------------------------------------------------------------------


def soma_init(
    variable: np.ndarray, momentum_dtype: str = "float32", **unused
) -> State:
    return {"momentum": np.zeros(variable.shape, numpy_dtype(momentum_dtype))}


def soma_step(
    variable: np.ndarray,
    gradient: np.ndarray,
    state: State,
    learning_rate: float,
    weight_decay: Optional[float] = None,
    momentum: float = 0.95,
    momentum_dtype: str = "float32",
) -> Tuple[np.ndarray, State]:
    """m <- momentum * m + (1 - momentum) * g;  theta <- theta - lr * sign(m)."""
    dtype = variable.dtype
    variable = apply_weight_decay(variable, learning_rate, weight_decay)
    average = state["momentum"].astype(np.float32) * np.float32(
        momentum
    ) + gradient.astype(np.float32) * np.float32(1.0 - momentum)
    average = average.astype(state["momentum"].dtype)
    step = _cast_learning_rate(learning_rate, dtype) * np.sign(
        average.astype(dtype)
    ).astype(dtype)
    return (variable - step).astype(dtype), {"momentum": average}


# ---------------------------------------------------------------------------
# GradSign
# ---------------------------------------------------------------------------


def gradsign_init(variable: np.ndarray, **unused) -> State:
    return {"sign_counter": np.zeros(variable.shape, np.int8)}


def gradsign_counter_update(counter: np.ndarray, gradient: np.ndarray):
    """c - floor((c + 4) / 8) + 8 * sign(g), in int32 (not yet stored)."""
    count = counter.astype(np.int32)
    count = count - np.floor_divide(count + 4, 8)
    return count + 8 * sign_with_zero(gradient)


def gradsign_step(
    variable: np.ndarray,
    gradient: np.ndarray,
    state: State,
    learning_rate: float,
    weight_decay: Optional[float] = None,
) -> Tuple[np.ndarray, State]:
    """c <- c - floor((c+4)/8) + 8 sign(g);  theta <- theta - lr * c / 64."""
    dtype = variable.dtype
    variable = apply_weight_decay(variable, learning_rate, weight_decay)
    count = gradsign_counter_update(state["sign_counter"], gradient)
    averaged_sign = (count.astype(dtype) / dtype.type(64)).astype(dtype)
    step = (_cast_learning_rate(learning_rate, dtype) * averaged_sign).astype(dtype)
    return (variable - step).astype(dtype), {"sign_counter": count.astype(np.int8)}
