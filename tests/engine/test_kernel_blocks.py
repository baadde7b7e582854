"""The numpy kernels' cache blocks never change a result (kernels_numpy.CHUNK, PHILOX_CHUNK).

Training with every blocked kernel cut into tiny blocks (8 elements; dropout masks drawn a few
examples at a time) must give, bit for bit, the parameters and optimizer slots that the default
blocks give: blocking is a speed choice, never part of the math.
"""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.engine import kernels_numpy
from orchestrator.engine.backend import numpy_backend
from orchestrator.engine.data import Dataset, Sampler
from orchestrator.engine.models import ModelSpec, build_model
from orchestrator.engine.network import SequentialSpec
from orchestrator.engine.optimizers import make_optimizer
from orchestrator.engine.step import Trainer
from orchestrator.engine.transformer import TransformerSpec

SPECS = {
    "mlp-rmsprop": (ModelSpec(kind="mlp", input_dim=24, hidden=(40, 40), num_classes=5, activation="relu",
                              keep_prob_input=0.8, keep_prob_hidden=0.5), "rmsprop"),
    "cnn-adam": (SequentialSpec(input_shape=(6, 6, 1), num_classes=5, layers=[
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": "same", "activation": "tanh"},
        {"type": "max_pooling2d"}, {"type": "flatten"}, {"type": "dense", "units": 16, "activation": "gelu"},
        {"type": "dropout", "rate": 0.3}, {"type": "dense"}]), "adam"),
    "transformer-adam": (TransformerSpec(vocab=11, context=12, d_model=16, heads=2, layers=1, dropout=0.2), "adam"),
}


def _dataset(spec) -> Dataset:
    data = np.random.default_rng(5)
    if isinstance(spec, TransformerSpec):
        x = data.integers(0, spec.vocab, (40, spec.context))
        return Dataset(x, np.roll(x, -1, axis=1), x[:4], x[:4], classes=spec.vocab)
    features = spec.input_dim if isinstance(spec, ModelSpec) else int(np.prod(spec.input_shape))
    x = data.random((40, features), dtype=np.float32)
    y = data.integers(0, spec.num_classes, 40)
    return Dataset(x, y, x[:4], y[:4], classes=spec.num_classes)


def _train(spec, optimizer: str, steps: int = 4) -> dict[str, bytes]:
    dataset = _dataset(spec)
    trainer = Trainer(build_model(spec, numpy_backend(), seed=1), make_optimizer(optimizer, 1e-2),
                      Sampler(len(dataset.train_y), 8, seed=1), dataset, seed=1)
    for _ in range(steps):
        trainer.train_step()
    return {v.name: v.numpy().tobytes() for v in trainer.state_variables()}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_tiny_blocks_train_bit_identically(name, monkeypatch):
    spec, optimizer = SPECS[name]
    reference = _train(spec, optimizer)
    monkeypatch.setattr(kernels_numpy, "CHUNK", 8)
    monkeypatch.setattr(kernels_numpy, "PHILOX_CHUNK", 16)
    blocked = _train(spec, optimizer)
    assert blocked.keys() == reference.keys()
    assert [name for name in reference if blocked[name] != reference[name]] == []


def test_causal_attention_masks_drawn_below_the_diagonal_train_bit_identically(monkeypatch):
    """Causal attention draws dropout bits only for the mask blocks holding a visible key (the
    others multiply zero probabilities): the same parameters, bit for bit, as drawing them all."""
    from orchestrator.engine.layers import attention

    spec = TransformerSpec(vocab=11, context=16, d_model=16, heads=2, layers=1, dropout=0.3)
    assert len(attention.causal_blocks(2, 16, 16)) < 2 * 16 * 16 // 8
    partial = _train(spec, "adam")
    monkeypatch.setattr(attention, "causal_blocks", lambda *shape: None)
    full = _train(spec, "adam")
    assert [name for name in full if partial[name] != full[name]] == []


@pytest.mark.parametrize("width", [7, 16, 64, 103, 256])
def test_row_sums_depend_on_the_row_alone(width):
    """``sum_last`` (layer norm's means, the softmax's and the loss's normalizers): a row's sum is the
    same bits whatever rows come with it, as in a block, a worker's slice or a single example."""
    rows = np.random.default_rng(width).standard_normal((1000, width)).astype(np.float32)
    full = kernels_numpy.sum_last(rows)
    for start, count in [(0, 1), (3, 2), (7, 3), (100, 13), (1, 511), (488, 512)]:
        assert full[start:start + count].tobytes() == kernels_numpy.sum_last(rows[start:start + count]).tobytes()
    np.testing.assert_allclose(full, rows.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-4)
