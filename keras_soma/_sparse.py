"""Private helpers for row-sliced (tf.IndexedSlices) gradients.

Keras on TensorFlow hands an Embedding layer's gradient to the optimizer
as `tf.IndexedSlices`: some rows of the table, possibly with repeated row
indices. On JAX gradients are always dense and these helpers are identity
functions.
"""

from __future__ import annotations

import keras


def is_row_sliced(gradient) -> bool:
    """True for a TensorFlow `tf.IndexedSlices` gradient."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return isinstance(gradient, tf.IndexedSlices)


def densify(gradient):
    """The dense tensor of a gradient (duplicate rows summed)."""
    if not is_row_sliced(gradient):
        return gradient
    import tensorflow as tf

    return tf.convert_to_tensor(gradient)


def values_of(gradient):
    """The numbers a gradient holds: `values` of IndexedSlices, else itself."""
    if is_row_sliced(gradient):
        return gradient.values
    return gradient


def unique_rows(gradient):
    """`(row_indices, row_gradients)` with each row index once.

    Rows that appear more than once in the IndexedSlices are summed first,
    which is what the dense gradient would hold for that row.
    """
    import tensorflow as tf

    unique_indices, positions = tf.unique(gradient.indices)
    summed = tf.math.unsorted_segment_sum(
        gradient.values, positions, tf.shape(unique_indices)[0]
    )
    return unique_indices, summed


def gather_rows(variable, indices):
    """Rows `indices` of a Keras (or tf) variable, read without reading
    the rest of it (a resource gather, not a read and then a gather)."""
    import tensorflow as tf

    native = variable.value if isinstance(variable, keras.Variable) else variable
    return tf.gather(native, indices)


def row_slices(rows, indices):
    """`rows` to be written at row `indices` of a variable: a
    tf.IndexedSlices, which `optimizer.assign` turns into a scatter."""
    import tensorflow as tf

    return tf.IndexedSlices(rows, indices)
