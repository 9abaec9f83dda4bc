"""Majority-vote Soma: 1-bit-style sign-compressed data parallelism on JAX.

```python
distribution = keras.distribution.DataParallel()
with distribution.scope():
    model = make_model()
    model.compile(optimizer=keras_soma.Soma(), loss=...)
    keras_soma.distribute.majority_vote(model)
    model.fit(...)
```

Under Keras's `DataParallel`, JAX all-reduces full-precision gradients
(4 bytes per parameter, twice over in a ring). With `majority_vote` each
data-parallel worker `k` keeps its own momentum of its *local* gradient
and only the signs of the momenta cross the network (signSGD with majority
vote, Bernstein et al., ICLR 2019):

```
m_k   <- momentum * m_k + (1 - momentum) * g_k       (on worker k)
tally  = sum_k sign(m_k)                              (an exact integer)
theta <- theta - theta * weight_decay * lr            (Keras's decoupled decay)
theta <- theta - lr * sign(tally)                     (on every worker)
```

`sign(0) = 0`: a worker whose momentum is exactly 0 abstains, and a tie
(possible with an even number of workers) leaves the parameter where it is
(but for weight decay). With one worker this is Soma.

Each momentum is stored as one variable of shape `[workers, *shape]`,
laid out along the data-parallel mesh axis: every device holds only its own
worker's momentum, and checkpoints save every worker's.

The train step (`model.train_step`, the hook Keras's JAX trainer calls)
computes the gradient of each worker's shard of the batch with
`jax.shard_map` and exchanges the votes in one of two ways (`exchange`):

* `"packed"` (default): each sign is a trit (-1, 0, +1) and five trits go
  in a byte. Worker `j` collects from every worker the packed votes of the
  `j`-th slice of the parameters (one all-to-all), tallies them and sends
  the packed majority of its slice to everyone (one all-gather): each worker
  sends `(N - 1) / N * 2 / 5` bytes per parameter, 1/20 of the
  `(N - 1) / N * 8` bytes of a float32 ring all-reduce.
* `"int8"`: one all-reduce (integer `psum`) of the int8 votes: simplest,
  `(N - 1) / N * 2` bytes per parameter, 1/4 of float32.

With `skip_nonfinite=True` a non-finite gradient on any worker skips the
step on every worker (weights and momenta untouched, counted in
`optimizer.skipped_steps`). Without it a worker whose momentum is NaN
abstains.

Metrics, the loss and other non-trainable state are computed as under
`DataParallel`: the loss is the mean of the workers' losses (equal shards),
the metrics see the whole batch's predictions, and float non-trainable
variables (batch-norm statistics) are averaged over the workers.

Reference: [Bernstein, Zhao, Azizzadenesheli, Anandkumar, 2019, "signSGD
with majority vote is communication efficient and fault
tolerant"](https://arxiv.org/abs/1810.05291).
"""

from __future__ import annotations

import inspect
import math

import keras
from keras import ops

from keras_soma.soma import Soma, soma_average

EXCHANGES = ("packed", "int8")
# Trits per byte in the packed exchange: 3**5 = 243 <= 256.
_TRITS_PER_BYTE = 5
_NOT_SUPPORTED = {
    "gradient_accumulation_steps": "gradient accumulation",
    "use_ema": "Keras's EMA (use keras_soma.PolyakAveraging)",
    "clipnorm": "clipping",
    "clipvalue": "clipping",
    "global_clipnorm": "clipping",
}


def majority_vote(model, exchange: str = "packed"):
    """Makes `model.fit` train with majority-vote Soma over the data axis.

    Call it after `model.compile` (with a `keras_soma.Soma` optimizer) and
    before training, inside the scope of a `keras.distribution.DataParallel`
    distribution, on the JAX backend. `fit`, `evaluate`, `predict`,
    `train_on_batch` and saving work as usual. To load a saved model, make
    it the same way (compile, `majority_vote`), build the optimizer and
    call `model.load_weights`: `keras.saving.load_model` alone makes a
    plain Soma, which refuses the per-worker momenta with a ValueError
    (see "Checkpoints" on the Scaling page).

    Memory: the momenta take `4 * workers` bytes per parameter in all (2 *
    workers with `momentum_dtype="bfloat16"`), 4 (2) on each device.

    Args:
        model: A compiled Keras model whose optimizer is a
            `keras_soma.Soma` that has not been built (trained) yet.
        exchange: How the votes travel: `"packed"` (five votes per byte,
            all-to-all then all-gather) or `"int8"` (an integer all-reduce
            of int8 votes). Defaults to `"packed"`.

    Returns:
        The model, whose `train_step` now does the majority vote.

    Raises:
        ValueError: on a backend other than JAX, without a `DataParallel`
            distribution, for an optimizer other than Soma (SM3 and
            GradSign have no momentum whose sign could be voted on), for
            an optimizer already built, or for an option the vote does not
            support (gradient accumulation, EMA, clipping, int8 momentum).
    """
    if exchange not in EXCHANGES:
        raise ValueError(
            f"`exchange` must be one of {EXCHANGES}; received: exchange={exchange!r}"
        )
    if keras.backend.backend() != "jax":
        raise ValueError(
            "majority_vote needs the JAX backend (it computes per-worker "
            "gradients with jax.shard_map); received: backend="
            f"{keras.backend.backend()!r}"
        )
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.DataParallel):
        raise ValueError(
            "majority_vote needs a keras.distribution.DataParallel "
            "distribution in scope (set it with "
            "`keras.distribution.set_distribution` or call this inside "
            "`distribution.scope()`): the workers vote along its data axis; "
            f"received: distribution={distribution!r}"
        )
    optimizer = getattr(model, "optimizer", None)
    if not isinstance(optimizer, Soma):
        raise ValueError(
            "majority_vote needs the model compiled with a keras_soma.Soma "
            "optimizer: the workers vote with the sign of their momentum, "
            "which SM3 and GradSign (and other optimizers) do not have; "
            f"received: optimizer={type(optimizer).__name__}"
        )
    for option, what in _NOT_SUPPORTED.items():
        value = getattr(optimizer, option, None)
        if value:
            raise ValueError(
                f"majority_vote does not support {what}: make the Soma "
                f"without `{option}`; received: {option}={value!r}"
            )
    if optimizer.momentum_dtype == "int8":
        raise ValueError(
            "majority_vote keeps each worker's momentum as a float: make the "
            'Soma with momentum_dtype "float32" or "bfloat16"; received: '
            "momentum_dtype='int8'"
        )
    if optimizer.lazy_sparse_updates:
        raise ValueError(
            "majority_vote applies dense votes: make the Soma without "
            "`lazy_sparse_updates`; received: lazy_sparse_updates=True"
        )
    if optimizer.built:
        raise ValueError(
            "majority_vote must be called before the optimizer is built "
            "(before training): it creates one momentum per worker; "
            f"received: an optimizer {optimizer.name!r} already built"
        )
    if not hasattr(model, "_update_metrics_variables"):
        # The JAX trainer's metric update, which the vote's step reuses.
        raise ValueError(
            "majority_vote needs a Keras whose JAX trainer has "
            "`_update_metrics_variables` (Keras 3.15 has it); received: "
            f"keras {keras.__version__}"
        )
    mesh = distribution.device_mesh
    axis = distribution.batch_dim_name
    workers = mesh.shape[list(mesh.axis_names).index(axis)]

    def layout_of(variable):
        return keras.distribution.TensorLayout(
            [axis] + [None] * len(variable.shape), mesh
        )

    optimizer._per_worker_momenta = (workers, layout_of)
    step = _VoteStep(model, distribution, exchange)
    # Keras's JAX trainer compiles `self.train_step(state, data)`; an
    # instance attribute takes the place of the class's method.
    model.train_step = step
    model.train_function = None
    if all(device.platform == "cpu" for device in step.mesh.devices.flat):
        wait_for_each_step(model)
    return model


def wait_for_each_step(model):
    """Makes `model.fit` wait for each train step before it starts the next.

    For `keras.distribution.DataParallel` (or `majority_vote`, which calls
    this itself) over CPU host devices
    (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) on the JAX
    backend. There, Keras's `fit` hands each step's logs to its callbacks on
    another thread (unless a callback that is not `async_safe` overrides a
    batch-end hook; with `verbose=0` or the progress bar alone it always
    does), so it dispatches steps ahead of the devices, and after some
    hundreds of steps XLA's in-process CPU collectives deadlock: three
    devices wait in an all-reduce for a fourth whose step never starts, and
    XLA aborts the process after its 40 s rendezvous timeout. Keras's own `DataParallel`
    with Keras's Adam does it too (`benchmarks/host_device_deadlock.py`).
    Waiting for each step's logs keeps one call of `train_function` (one
    step, or `steps_per_execution` steps) in flight.

    ```python
    with keras.distribution.DataParallel().scope():
        model = make_model()
        model.compile(optimizer=keras_soma.Soma(), loss=...)
    keras_soma.distribute.wait_for_each_step(model)
    model.fit(...)
    ```

    It is meant for host devices, where the host and the devices share the
    cores and the overlap it gives up is small; on accelerators it would
    cost the overlap of dispatch and compute.

    Args:
        model: A Keras model on the JAX backend.

    Returns:
        The model, whose `make_train_function` now wraps Keras's train
        function (the JAX trainer's `train_function(state, data) -> (logs,
        state)`; tests/test_distribute.py fails if Keras stops building and
        calling the step through these).
    """
    if keras.backend.backend() != "jax":
        raise ValueError(
            "wait_for_each_step is for the JAX backend (whose fit dispatches "
            "steps ahead of the devices); received: backend="
            f"{keras.backend.backend()!r}"
        )
    make = model.make_train_function

    def make_train_function(force=False):
        make(force)
        function = model.train_function
        if getattr(function, "waits_for_each_step", False):
            return

        def train_function(state, data):
            import jax

            logs, state = function(state, data)
            jax.block_until_ready(logs)
            return logs, state

        train_function.waits_for_each_step = True
        model.train_function = train_function

    model.make_train_function = make_train_function
    model.train_function = None
    return model


def _shard_map(function, mesh, in_specs, out_specs):
    import jax

    if hasattr(jax, "shard_map"):
        return jax.shard_map(
            function,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            check_vma=False,
        )
    from jax.experimental.shard_map import shard_map

    return shard_map(
        function, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False
    )


def _backend_mesh(device_mesh):
    """The `jax.sharding.Mesh` of a Keras `DeviceMesh`."""
    if hasattr(device_mesh, "backend_mesh"):
        return device_mesh.backend_mesh
    import jax
    import numpy as np

    by_name = {f"{d.platform}:{d.id}": d for d in jax.devices()}
    devices = np.vectorize(lambda name: by_name[str(name)], otypes=[object])(
        np.asarray(device_mesh.devices)
    )
    return jax.sharding.Mesh(devices, device_mesh.axis_names)


def _pack_trits(trits):
    """Packs values in {0, 1, 2} five to a byte (`sum t_i * 3**i`) along
    the last axis, whose length is a multiple of 5."""
    import jax.numpy as jnp

    trits = trits.astype(jnp.uint8).reshape(*trits.shape[:-1], -1, _TRITS_PER_BYTE)
    powers = jnp.asarray([3**i for i in range(_TRITS_PER_BYTE)], jnp.uint8)
    return jnp.sum(trits * powers, axis=-1, dtype=jnp.uint8)


def _unpack_trits(packed):
    """The inverse of `_pack_trits`."""
    import jax.numpy as jnp

    powers = jnp.asarray([3**i for i in range(_TRITS_PER_BYTE)], jnp.uint8)
    trits = (packed[..., None] // powers) % 3
    return trits.reshape(*packed.shape[:-1], -1)


def _exchange_votes(votes, axis, workers, exchange):
    """The majority `sign(sum over workers of votes)` of the int8 `votes`
    (-1, 0 or +1) of each worker, inside `shard_map` over `axis`; the same
    int8 vector on every worker."""
    import jax
    import jax.numpy as jnp

    if exchange == "int8":
        tally_dtype = jnp.int8 if workers <= 127 else jnp.int16
        tally = jax.lax.psum(votes.astype(tally_dtype), axis)
        return jnp.sign(tally).astype(jnp.int8)
    size = votes.shape[0]
    chunk = _TRITS_PER_BYTE * math.ceil(size / (_TRITS_PER_BYTE * workers))
    trits = jnp.pad(votes + 1, (0, chunk * workers - size), constant_values=1)
    packed = _pack_trits(trits.reshape(workers, chunk))
    # Row j goes to worker j; worker j gets row j of every worker.
    received = jax.lax.all_to_all(packed, axis, 0, 0, tiled=True)
    tally = jnp.sum(_unpack_trits(received).astype(jnp.int32) - 1, axis=0)
    majority = _pack_trits(jnp.sign(tally) + 1)
    gathered = jax.lax.all_gather(majority, axis, tiled=True)
    return (_unpack_trits(gathered).astype(jnp.int8) - 1)[:size]


def _sign_int8(values):
    """sign(values) as int8, with sign(0) = sign(NaN) = 0."""
    import jax.numpy as jnp

    return (values > 0).astype(jnp.int8) - (values < 0).astype(jnp.int8)


class _VoteStep:
    """The train step `majority_vote` gives the model: Keras's JAX
    `train_step(state, data)` with per-worker gradients and the vote."""

    def __init__(self, model, distribution, exchange):
        self.model = model
        self.distribution = distribution
        self.exchange = exchange
        self.axis = distribution.batch_dim_name
        mesh = distribution.device_mesh
        self.workers = mesh.shape[list(mesh.axis_names).index(self.axis)]
        self.mesh = _backend_mesh(mesh)
        self.passes_optimizer_variables = (
            "optimizer_variables"
            in inspect.signature(model.compute_loss_and_updates).parameters
        )

    def __call__(self, state, data):
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec

        model, axis = self.model, self.axis
        optimizer = model.optimizer
        trainable, non_trainable, optimizer_values, metrics_values = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        position = {id(v): i for i, v in enumerate(optimizer.variables)}
        momentum_positions = [position[id(m)] for m in optimizer._momentums]
        momenta = [optimizer_values[i] for i in momentum_positions]
        momentum = optimizer.momentum

        def local_step(trainable, non_trainable, metrics_values, momenta, x, y, sw):
            extra = {}
            if self.passes_optimizer_variables:
                extra["optimizer_variables"] = optimizer_values
            (_, aux), grads = jax.value_and_grad(
                model.compute_loss_and_updates, has_aux=True
            )(
                trainable,
                non_trainable,
                metrics_values,
                x,
                y,
                sw,
                training=True,
                **extra,
            )
            loss, y_pred, new_non_trainable = aux[0], aux[1], aux[2]
            finite = jnp.all(
                jnp.asarray([jnp.all(jnp.isfinite(g)) for g in grads] or [True])
            )
            all_finite = jax.lax.pmin(finite.astype(jnp.int32), axis) > 0
            new_momenta = [
                soma_average(gradient, local[0], momentum)[None]
                for gradient, local in zip(grads, momenta)
            ]
            votes = jnp.concatenate([_sign_int8(m).reshape(-1) for m in new_momenta])
            majority = _exchange_votes(votes, axis, self.workers, self.exchange)
            split, start = [], 0
            for variable in trainable:
                split.append(
                    majority[start : start + variable.size].reshape(variable.shape)
                )
                start += variable.size
            new_non_trainable = [
                jax.lax.pmean(value, axis)
                if jnp.issubdtype(value.dtype, jnp.floating)
                else value
                for value in new_non_trainable
            ]
            return (
                split,
                new_momenta,
                all_finite,
                jnp.reshape(loss, (1,)),
                y_pred,
                new_non_trainable,
            )

        replicated = PartitionSpec()
        sharded = PartitionSpec(axis)
        shard = lambda tree: jax.tree.map(lambda _: sharded, tree)  # noqa: E731
        copy = lambda tree: jax.tree.map(lambda _: replicated, tree)  # noqa: E731
        y_pred_spec = sharded  # a prefix: every output has the batch first
        step = _shard_map(
            local_step,
            self.mesh,
            in_specs=(
                copy(trainable),
                copy(non_trainable),
                copy(metrics_values),
                shard(momenta),
                shard(x),
                shard(y),
                shard(sample_weight),
            ),
            out_specs=(
                copy(trainable),
                shard(momenta),
                replicated,
                sharded,
                y_pred_spec,
                copy(non_trainable),
            ),
        )
        majority, new_momenta, all_finite, losses, y_pred, non_trainable = step(
            trainable, non_trainable, metrics_values, momenta, x, y, sample_weight
        )
        loss = jnp.mean(losses)

        mapping = list(zip(optimizer.variables, optimizer_values))
        with keras.StatelessScope(state_mapping=mapping):
            # The schedule's value at the mapped `iterations`.
            learning_rate = ops.convert_to_tensor(optimizer.learning_rate)
        new_trainable = []
        for variable, value, vote in zip(
            model.trainable_variables, trainable, majority
        ):
            rate = ops.cast(learning_rate, value.dtype)
            moved = value
            decay = optimizer._weight_decay_for(variable)
            if decay is not None:
                moved = moved - moved * decay * rate
            moved = moved - rate * vote.astype(value.dtype)
            if optimizer.skip_nonfinite:
                moved = jnp.where(all_finite, moved, value)
            new_trainable.append(moved)
        new_optimizer_values = list(optimizer_values)
        for index, old, new in zip(momentum_positions, momenta, new_momenta):
            if optimizer.skip_nonfinite:
                new = jnp.where(all_finite, new, old)
            new_optimizer_values[index] = new
        iterations = position[id(optimizer._iterations)]
        new_optimizer_values[iterations] = optimizer_values[iterations] + 1
        if optimizer.skip_nonfinite:
            skipped = position[id(optimizer.skipped_steps)]
            new_optimizer_values[skipped] = optimizer_values[skipped] + (
                1 - all_finite.astype(optimizer_values[skipped].dtype)
            )
        logs, metrics_values = model._update_metrics_variables(
            metrics_values, loss, x, y, y_pred, sample_weight
        )
        return logs, (
            new_trainable,
            non_trainable,
            new_optimizer_values,
            metrics_values,
        )
