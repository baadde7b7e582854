"""orchestrator: distributed training on Ray with TensorFlow-compatible sharded checkpoints."""

__version__ = "0.1.0"
