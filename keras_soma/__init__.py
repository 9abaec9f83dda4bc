"""keras_soma: memory-efficient Keras 3 optimizers.

```python
import keras_soma
model.compile(optimizer=keras_soma.Soma(), loss=..., metrics=[...])
```

* `Soma`: the sign of momentum, half of Adam's state (4 bytes/parameter).
* `GradSign`: an int8 moving average of the gradient's sign (1 byte).
* `SM3`: AdaGrad-like adaptivity with one accumulator per tensor axis
  (a few hundredths of a byte per parameter without momentum).
* `schedules.WarmupCooldown`: warm-up / cool-down learning-rate schedule.
* `PolyakAveraging`: a callback keeping averaged weights for evaluation
  and serving, with any optimizer.
* `monitoring.SkippedSteps`: the steps `skip_nonfinite=True` skipped, as a
  metric in fit's logs; `memory.state_bytes_per_parameter` measures state.
* `distribute.majority_vote(model)`: data-parallel Soma on JAX whose
  workers exchange packed signs of their own momenta (signSGD with
  majority vote), 1/20 of a float32 all-reduce's traffic.

Importing the package registers the optimizers and the schedule with
Keras's serialization, so `.keras` files that use them load without
`custom_objects` (callbacks are not saved in `.keras` files).
"""

from keras_soma import distribute, memory, monitoring, schedules
from keras_soma.callbacks import PolyakAveraging
from keras_soma.gradsign import GradSign
from keras_soma.sm3 import SM3
from keras_soma.soma import Soma

__version__ = "0.1.0"

__all__ = [
    "GradSign",
    "PolyakAveraging",
    "SM3",
    "Soma",
    "distribute",
    "memory",
    "monitoring",
    "schedules",
]
