"""numpy and cupy agree (runs where a CUDA GPU and cupy are present; skipped with the reason elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.checkpoint.variables import Variable
from orchestrator.engine import kernels_numpy, rng
from orchestrator.engine.backend import get_backend, numpy_backend
from orchestrator.engine.data import Sampler, load_dataset
from orchestrator.engine.models import ModelSpec, build_model
from orchestrator.engine.optimizers import make_optimizer
from orchestrator.engine.step import Trainer

pytestmark = pytest.mark.gpu

SPEC = ModelSpec(kind="mlp", input_dim=64, hidden=(48, 32), num_classes=10, activation="relu",
                 keep_prob_input=0.8, keep_prob_hidden=0.5)


@pytest.mark.parametrize("keep_prob", [0.5, 0.8, 0.9])
def test_dropout_masks_are_bit_identical(gpu_backend, keep_prob):
    for layer, offset in [(0, 0), (1, 37), (2, 2**32 - 3)]:
        gpu = gpu_backend.ops.dropout_mask(123456789012, 77, layer, offset, (19, 131), keep_prob, np.float32)
        cpu = kernels_numpy.dropout_mask(123456789012, 77, layer, offset, (19, 131), keep_prob, np.float32)
        assert gpu_backend.to_host(gpu).tobytes() == cpu.tobytes()
    keep = rng.keep_mask(5, 0, 0, 0, 300, 300, keep_prob)
    assert abs(keep.mean() - keep_prob) < 0.01


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_and_gradients_agree(gpu_backend, activation, dtype):
    spec = ModelSpec(**{**SPEC.to_dict(), "activation": activation})
    cpu_model, gpu_model = build_model(spec, numpy_backend(), 3), build_model(spec, gpu_backend, 3)
    data = np.random.default_rng(0)
    x, y = data.random((40, 64)).astype(dtype), data.integers(0, 10, 40)
    kwargs = dict(step=5, example_offset=8, global_batch_size=64, seed=11)
    cpu_params = {k: v.astype(dtype) for k, v in cpu_model.params().items()}
    gpu_params = {k: gpu_backend.asarray(v) for k, v in cpu_params.items()}
    cpu_loss, cpu_correct, cpu_grads = cpu_model.loss_and_grads(cpu_params, x, y, **kwargs)
    gpu_loss, gpu_correct, gpu_grads = gpu_model.loss_and_grads(gpu_params, gpu_backend.asarray(x),
                                                                gpu_backend.asarray(y), **kwargs)
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    assert gpu_loss == pytest.approx(cpu_loss, rel=tolerance)
    assert gpu_correct == cpu_correct
    for name in cpu_grads:
        np.testing.assert_allclose(gpu_backend.to_host(gpu_grads[name]), cpu_grads[name],
                                   rtol=tolerance, atol=tolerance * 1e-2, err_msg=name)


@pytest.mark.parametrize("name", ["sgd", "momentum", "rmsprop", "adam"])
def test_fused_optimizer_updates_agree(gpu_backend, name):
    optimizer = make_optimizer(name, 0.01, momentum=0.9, decay=0.9)
    data = np.random.default_rng(1)
    initial = data.normal(size=(33, 17)).astype(np.float32)
    cpu, gpu = Variable("w", initial.copy()), Variable("w", gpu_backend.asarray(initial))
    cpu_slots, gpu_slots = optimizer.create_slots(cpu), optimizer.create_slots(gpu)
    for step in range(5):
        grad = data.normal(size=(33, 17)).astype(np.float32)
        optimizer.apply(cpu, grad, cpu_slots, step)
        optimizer.apply(gpu, gpu_backend.asarray(grad), gpu_slots, step)
    np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), rtol=1e-6, atol=1e-7)
    for a, b in zip(gpu_slots, cpu_slots):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-8, err_msg=a.name)


def test_training_on_gpu_tracks_cpu_training(gpu_backend):
    digits = load_dataset("digits")
    trainers = [Trainer(build_model(SPEC, backend, 0), make_optimizer("rmsprop", 1e-3),
                        Sampler(len(digits.train_y), 64, 0), digits, 0)
                for backend in (numpy_backend(), gpu_backend)]
    for _ in range(30):
        cpu_metrics, gpu_metrics = (t.train_step() for t in trainers)
        assert gpu_metrics.loss == pytest.approx(cpu_metrics.loss, rel=1e-3)
    for a, b in zip(*(t.model.variables for t in trainers)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-5, err_msg=a.name)


def test_gpu_device_name_resolves_to_cupy(gpu_backend):
    assert get_backend("gpu").name == "cupy" and get_backend("auto").name == "cupy"


@pytest.mark.parametrize("case", ["cnn", "max-pooling", "average-pooling", "attention-causal-dropout", "transformer"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_networks_agree(gpu_backend, case, dtype):
    """Every fused layer kernel (bias+activation, layer norm, attention softmax, dropout, embedding
    scatter) gives numpy's loss and gradients on a CNN and a transformer."""
    from tests.engine.test_layers import _problem

    cpu_model, cpu_params, x, y = _problem(case, numpy_backend(), batch=6)
    gpu_model = cpu_model.spec.build(gpu_backend, seed=1)
    cpu_params = {k: v.astype(dtype) for k, v in cpu_params.items()}
    gpu_params = {k: gpu_backend.asarray(v) for k, v in cpu_params.items()}
    kwargs = dict(step=2, example_offset=3, global_batch_size=10, seed=7)
    cpu_loss, cpu_correct, cpu_grads = cpu_model.loss_and_grads(cpu_params, x, y, **kwargs)
    gpu_loss, gpu_correct, gpu_grads = gpu_model.loss_and_grads(gpu_params, gpu_backend.asarray(x),
                                                                gpu_backend.asarray(y), **kwargs)
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    assert gpu_loss == pytest.approx(cpu_loss, rel=tolerance)
    assert gpu_correct == pytest.approx(cpu_correct)
    for name in cpu_grads:
        np.testing.assert_allclose(gpu_backend.to_host(gpu_grads[name]), cpu_grads[name],
                                   rtol=tolerance, atol=tolerance * 1e-2, err_msg=name)
