"""Private helpers for sparse gradients, on every backend.

The sparse forms a Keras optimizer is handed, by backend:

* TensorFlow: `tf.IndexedSlices`, what an `Embedding` layer's gradient is
  (some rows of the table, possibly with repeated row indices).
* JAX: `jax.experimental.sparse.BCOO`. JAX's autodiff gives dense
  gradients, so Keras never makes one itself, but Keras's optimizers
  accept it (Keras's own sparse-gradient test applies one). A BCOO with
  one sparse dimension and no batch dimension names whole rows, like
  IndexedSlices; any other layout is element-wise.
* torch: Keras never hands one (its `Embedding` calls
  `torch.nn.functional.embedding` with `sparse=False`, and Keras's torch
  backend does not support sparse tensors), but Keras's own optimizers
  accept a torch sparse COO tensor given by hand, such as the gradient of
  a `torch.nn.Embedding(sparse=True)`. One with one sparse dimension names
  whole rows.

A "row-sliced" gradient is one that names whole rows: the optimizers with
a row path (`update_rows_with`; `update_int8_rows_with` for a blockwise
int8 momentum, whose blocks run across rows) read and write only those
rows (and, for the int8 momentum, the groups of whole rows and blocks
that hold them). Every
other sparse gradient is made dense.
"""

from __future__ import annotations

import keras
from keras import ops


def is_sparse(gradient) -> bool:
    """True for a gradient in one of the backend's sparse forms."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return isinstance(gradient, tf.IndexedSlices)
    if backend == "jax":
        from jax.experimental import sparse as jax_sparse

        return isinstance(gradient, jax_sparse.JAXSparse)
    if backend == "torch":
        import torch

        return isinstance(gradient, torch.Tensor) and gradient.layout != torch.strided
    return False


def is_row_sliced(gradient) -> bool:
    """True for a sparse gradient that names whole rows of its variable:
    a `tf.IndexedSlices`, a BCOO whose only sparse dimension is the first
    (no batch dimensions), or a torch sparse COO tensor with one sparse
    dimension."""
    if not is_sparse(gradient):
        return False
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return True
    if backend == "jax":
        from jax.experimental import sparse as jax_sparse

        return (
            isinstance(gradient, jax_sparse.BCOO)
            and gradient.n_batch == 0
            and gradient.n_sparse == 1
        )
    import torch

    return gradient.layout == torch.sparse_coo and gradient.sparse_dim() == 1


def densify(gradient):
    """The dense tensor of a gradient (duplicate entries summed)."""
    if not is_sparse(gradient):
        return gradient
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(gradient)
    if backend == "jax":
        return gradient.todense()
    return gradient.to_dense()


def values_of(gradient):
    """The numbers a gradient holds, to check for NaN and Inf: the values
    of IndexedSlices, the data of a BCOO (padding entries, zeros, included),
    the values of a torch sparse COO tensor, else the gradient itself."""
    if not is_sparse(gradient):
        return gradient
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return gradient.values
    if backend == "jax":
        return gradient.data
    import torch

    if gradient.layout == torch.sparse_coo:
        return gradient.coalesce().values()
    return gradient.to_dense()


def unique_rows(gradient):
    """`(row_indices, row_gradients)` of a row-sliced gradient, each row
    index once.

    Rows that appear more than once are summed first, which is what the
    dense gradient would hold for that row. On JAX the number of rows stays
    the BCOO's `nse` (static under `jax.jit`): the rows left over are
    padding, with the out-of-range index `shape[0]`, which `gather_rows`
    reads as zeros and `rows_written` drops.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        unique_indices, positions = tf.unique(gradient.indices)
        summed = tf.math.unsorted_segment_sum(
            gradient.values, positions, tf.shape(unique_indices)[0]
        )
        return unique_indices, summed
    if backend == "jax":
        from jax.experimental import sparse as jax_sparse

        summed = jax_sparse.bcoo_sum_duplicates(gradient, nse=gradient.nse)
        return summed.indices[:, 0], summed.data
    coalesced = gradient.coalesce()
    return coalesced.indices()[0], coalesced.values()


def gather_rows(variable, indices, padded: bool = False):
    """Rows `indices` of a Keras (or backend) variable.

    On TensorFlow a resource gather, which reads those rows and nothing
    else. On JAX out-of-range indices (BCOO padding) read zeros; with
    `padded=True` indices at or beyond the first dimension read zeros on
    every backend.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        value = ops.convert_to_tensor(variable)
        return value.at[indices].get(mode="fill", fill_value=0)
    rows = variable.shape[0]
    valid = ops.less(indices, rows) if padded else None
    if valid is not None:
        indices = ops.minimum(indices, rows - 1)
    if backend == "tensorflow":
        import tensorflow as tf

        native = variable.value if isinstance(variable, keras.Variable) else variable
        gathered = tf.gather(native, indices)
    else:
        gathered = ops.take(ops.convert_to_tensor(variable), indices, axis=0)
    if valid is None:
        return gathered
    valid = ops.reshape(valid, (-1,) + (1,) * (len(gathered.shape) - 1))
    return ops.where(valid, gathered, ops.zeros_like(gathered))


def rows_written(variable, rows, indices, padded: bool = False):
    """What to `assign` to `variable` so that its rows `indices` become
    `rows` and the others stay as they are.

    On TensorFlow a `tf.IndexedSlices`, which `optimizer.assign` turns into
    a scatter that writes those rows only. Elsewhere the variable's new
    value: on JAX `.at[indices].set`, which XLA does in place when the
    step is compiled with the variables donated (out-of-range indices,
    BCOO padding, are dropped); on torch a scatter into a copy.

    With `padded=True`, `indices` are runs of consecutive rows, and rows
    at or beyond the first dimension are not written on any backend. On
    TensorFlow and torch each such row follows the variable's last row in
    its run, and is written there with that row's values (the same values
    several times), which keeps every shape as it is: dropping the rows
    with a boolean mask instead lost every write under XLA
    (`jit_compile=True`, TensorFlow 2.21).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        value = ops.convert_to_tensor(variable)
        return value.at[indices].set(rows, mode="drop")
    if padded:
        last = variable.shape[0] - 1
        beyond = ops.maximum(ops.subtract(indices, last), 0)
        steps = ops.arange(ops.shape(indices)[0], dtype=indices.dtype)
        rows = ops.take(rows, ops.subtract(steps, beyond), axis=0)
        indices = ops.minimum(indices, last)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.IndexedSlices(rows, indices)
    value = ops.convert_to_tensor(variable)
    return ops.scatter_update(value, ops.expand_dims(indices, 1), rows)


def unique_with_positions(values, fill_value):
    """`(unique, positions)` of a 1-D integer tensor: its distinct values
    and, for each element, the position of its value in `unique`
    (`unique[positions] == values`). On JAX `unique` keeps the length of
    `values` (static under `jax.jit`), padded with `fill_value`."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.unique(values)
    if backend == "jax":
        import jax.numpy as jnp

        unique, positions = jnp.unique(
            values, size=values.shape[0], fill_value=fill_value, return_inverse=True
        )
        return unique, jnp.reshape(positions, (-1,))
    import torch

    return torch.unique(values, return_inverse=True)


def map_values(gradient, function):
    """`gradient` with `function` applied to the numbers it holds, in the
    same form: a dense tensor, or a row-sliced or COO gradient with the
    same indices (other sparse forms are made dense first). `function`
    works element-wise."""
    if gradient is None:
        return None
    if not is_sparse(gradient):
        return function(gradient)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.IndexedSlices(
            function(gradient.values), gradient.indices, gradient.dense_shape
        )
    if backend == "jax":
        from jax.experimental import sparse as jax_sparse

        if isinstance(gradient, jax_sparse.BCOO):
            return jax_sparse.BCOO(
                (function(gradient.data), gradient.indices), shape=gradient.shape
            )
        return function(gradient.todense())
    import torch

    if gradient.layout == torch.sparse_coo:
        gradient = gradient.coalesce()
        return torch.sparse_coo_tensor(
            gradient.indices(),
            function(gradient.values()),
            gradient.shape,
            is_coalesced=True,
            check_invariants=False,
        )
    return function(gradient.to_dense())
