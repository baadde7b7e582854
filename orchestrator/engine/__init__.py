"""The training engine: array backend (numpy/cupy), kernels, models, optimizers, data, training step.

Modules: ``backend`` (device choice), ``kernels_numpy``/``kernels_cupy`` (same functions, two
devices), ``rng`` (Philox dropout bits), ``models``, ``optimizers``, ``data``, ``step``,
``loading`` (``load_model``). Never imports Ray.
"""
