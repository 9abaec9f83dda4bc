"""How much memory an optimizer's state takes."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from keras_soma._common import numpy_dtype


def _nbytes(variable) -> int:
    import keras

    dtype = numpy_dtype(keras.backend.standardize_dtype(variable.dtype))
    return int(np.prod(variable.shape, dtype=np.int64)) * dtype.itemsize


def optimizer_state_bytes(optimizer, include_scalars: bool = False) -> int:
    """Bytes held by `optimizer.variables`.

    Args:
        optimizer: A built Keras optimizer.
        include_scalars: Whether to count rank-0 variables (the iteration
            counter, the learning rate), which do not grow with the model.
            Defaults to `False`.

    Returns:
        The number of bytes.
    """
    return sum(
        _nbytes(variable)
        for variable in optimizer.variables
        if include_scalars or len(variable.shape) > 0
    )


def state_bytes_per_parameter(optimizer, trainable_variables: Iterable) -> float:
    """Optimizer state bytes per trainable parameter (scalars aside).

    Args:
        optimizer: A built Keras optimizer.
        trainable_variables: The variables it trains, e.g.
            `model.trainable_variables`.

    Returns:
        `optimizer_state_bytes(optimizer) / number of parameters`.

    Example:

    ```python
    model.fit(...)
    keras_soma.memory.state_bytes_per_parameter(
        model.optimizer, model.trainable_variables
    )  # 4.0 for Soma
    ```
    """
    parameters = sum(
        int(np.prod(variable.shape, dtype=np.int64)) for variable in trainable_variables
    )
    if parameters == 0:
        raise ValueError("Argument `trainable_variables` holds no parameters.")
    return optimizer_state_bytes(optimizer) / parameters
