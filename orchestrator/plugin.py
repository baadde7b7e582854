"""What a plug-in model imports: the public protocol (``docs/plugins.md``).

    from orchestrator.plugin import Variable, uniform

    def build(*, input_shape, num_classes, backend, seed, **args):
        return MyModel(...)          # variables, loss_and_grads, evaluate

- ``Variable(name, value)``: a named parameter (TF-style names, "dense/kernel"); the same
  class as ``orchestrator.checkpoint.Variable``.
- ``TrainableModel``: the protocol as a ``typing.Protocol`` (for type checkers and
  ``isinstance``).
- ``uniform(seed, step, example_offset, shape, stream=0)``: the randomness helper; row i is
  a pure function of ``(seed, step, stream, example_offset + i)``, which keeps multi-worker
  training and resume bit-identical.
- ``PluginError``: raise it from a factory to report bad arguments in one line.
"""

from orchestrator.checkpoint.variables import Variable
from orchestrator.engine.backend import Backend
from orchestrator.engine.protocol import PluginError, TrainableModel
from orchestrator.engine.rng import uniform

__all__ = ["Variable", "Backend", "TrainableModel", "PluginError", "uniform"]
