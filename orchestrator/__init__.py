"""orchestrator: distributed training on Ray with TensorFlow-compatible sharded checkpoints.

``orchestrator.checkpoint`` is the checkpoint library (no Ray), ``orchestrator.engine`` the
numpy/cupy training math, ``orchestrator.cluster`` the Ray runtime, ``orchestrator.cli`` the
command line. ``load_model(path)`` rebuilds a ready-to-run model from a checkpoint alone.
"""

__version__ = "0.1.0"


def load_model(path, storage_options=None, device="cpu", factory=None):
    """Rebuild the model saved in checkpoint ``path`` (a prefix or a directory), weights included.

    Uses the structure record stored beside the weights; never executes code from the file.
    A plug-in model is rebuilt by ``factory`` ("module:callable" or the callable), which the
    caller names: a checkpoint never makes this function import anything.
    """
    from orchestrator.engine.loading import load_model as _load_model  # keeps `import orchestrator` light

    return _load_model(path, storage_options=storage_options, device=device, factory=factory)


__all__ = ["__version__", "load_model"]
