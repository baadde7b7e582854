"""load_model: rebuild a ready-to-run model from a checkpoint's structure record and weights."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.checkpoint.structure import STRUCTURE_KEY, structure_tensors
from orchestrator.checkpoint.writer import write_checkpoint
from orchestrator.engine.backend import numpy_backend
from orchestrator.engine.data import Sampler, load_dataset
from orchestrator.engine.loading import ModelLoadError, load_model, model_structure_tensors
from orchestrator.engine.models import ModelSpec, build_model
from orchestrator.engine.optimizers import make_optimizer
from orchestrator.engine.step import Trainer

SPEC = ModelSpec(kind="mlp", input_dim=64, hidden=(32, 16), num_classes=10, activation="gelu",
                 keep_prob_input=0.8, keep_prob_hidden=0.5)


@pytest.fixture(scope="module")
def trained():
    digits = load_dataset("digits")
    trainer = Trainer(build_model(SPEC, numpy_backend(), 4), make_optimizer("rmsprop", 1e-3),
                      Sampler(len(digits.train_y), 64, 4), digits, 4)
    for _ in range(20):
        trainer.train_step()
    return trainer, digits


def _save(trainer, prefix, options=None, num_shards=2, extra=None):
    tensors = {v.name: v.numpy() for v in trainer.state_variables()}
    tensors.update(model_structure_tensors(trainer.model))
    tensors.update(extra or {})
    write_checkpoint(prefix, tensors, num_shards=num_shards, storage_options=options)


def test_loaded_model_has_the_saved_weights_and_predicts_the_same(trained, any_root):
    trainer, digits = trained
    root, options = any_root
    prefix = f"{root}/ckpt/model.ckpt-20"
    _save(trainer, prefix, options)
    model = load_model(prefix, storage_options=options)
    assert model.spec == SPEC and model.param_names == trainer.model.param_names
    for loaded, saved in zip(model.variables, trainer.model.variables):
        assert loaded.numpy().tobytes() == saved.numpy().tobytes(), loaded.name
    np.testing.assert_array_equal(model.logits(None, digits.test_x), trainer.model.logits(None, digits.test_x))
    assert model.evaluate(None, digits.test_x, digits.test_y) == trainer.evaluate()


def test_checkpoint_without_structure_record_is_refused(trained, tmp_path):
    trainer, _ = trained
    prefix = str(tmp_path / "plain")
    write_checkpoint(prefix, {v.name: v.numpy() for v in trainer.model.variables})
    with pytest.raises(ModelLoadError, match="no model structure record"):
        load_model(prefix)


def test_shape_mismatch_names_the_tensor(trained, tmp_path):
    trainer, _ = trained
    prefix = str(tmp_path / "bad")
    _save(trainer, prefix, extra={"dense_1/kernel": np.zeros((32, 17), np.float32)})
    with pytest.raises(ModelLoadError, match=r"'dense_1/kernel' has shape \(32, 17\)"):
        load_model(prefix)


def test_structure_listing_other_variables_is_refused(trained, tmp_path):
    trainer, _ = trained
    prefix = str(tmp_path / "renamed")
    names = trainer.model.param_names[:-1] + ["head/bias"]
    _save(trainer, prefix, extra=structure_tensors(SPEC.to_dict(), names))
    with pytest.raises(ModelLoadError, match="head/bias"):
        load_model(prefix)


def test_bad_spec_in_record_is_refused_by_key(trained, tmp_path):
    trainer, _ = trained
    prefix = str(tmp_path / "badspec")
    spec = {**SPEC.to_dict(), "__reduce__": "os.system"}
    _save(trainer, prefix, extra=structure_tensors(spec, trainer.model.param_names))
    with pytest.raises(ModelLoadError, match="__reduce__"):
        load_model(prefix)
    assert STRUCTURE_KEY == "_MODEL_STRUCTURE"
