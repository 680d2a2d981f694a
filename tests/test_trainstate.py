"""Resumable loops without a run directory (flopmatch.trainstate): the cached evaluators' trainings stopped by Ctrl-C
and continued equal an uninterrupted training bit for bit. (The learned tokenizers': test_learned_tokenizers.py.)"""

from __future__ import annotations

import signal

import pytest
import torch

import flopmatch.evaluation.attributes as attributes
from flopmatch.data.shapes import ShapesConfig, ShapesDataset
from flopmatch.errors import UserError
from flopmatch.evaluation.classes import train_class_classifier
from flopmatch.evaluation.clipscore import train_domain_clip
from flopmatch.trainstate import STATE_FILE, TrainingState

STEPS = 6


@pytest.fixture(scope="module")
def scenes():
    ds = ShapesDataset(ShapesConfig(num_train=40, num_eval=0), "train", disk_cache=False)
    return ds.images_uint8(), ds.captions()


def _trainers(scenes):
    images, captions = scenes
    labels = [i % 10 for i in range(len(captions))]
    return {
        "attributes": lambda state_file: attributes.train_attribute_classifier(ShapesConfig(), progress=False, steps=STEPS,
                                                                               state_file=state_file),
        "classes": lambda state_file: train_class_classifier(images, labels, 32, steps=STEPS, progress=False,
                                                             state_file=state_file),
        "clip": lambda state_file: train_domain_clip(images, captions, progress=False, steps=STEPS, state_file=state_file),
    }


@pytest.mark.parametrize("name", ["attributes", "classes", "clip"])
def test_an_evaluator_training_stopped_by_ctrl_c_resumes_to_the_uninterrupted_weights(name, scenes, tmp_path, monkeypatch):
    """Ctrl-C after step 3 of 6 saves the state (network, AdamW, one-cycle LR, batch order, generator) at the step's
    end; the next call continues from it and ends at the uninterrupted training's weights and final loss."""
    monkeypatch.setattr(attributes, "NUM_TRAIN_SCENES", 300)  # the classifier's rendered training scenes: fewer
    train = _trainers(scenes)[name]
    direct, direct_info = train(None)
    real, fired = TrainingState.end_of_step, []

    def ctrl_c_at_step_2(self, step, steps, **kw):
        if step == 2 and not fired:
            fired.append(step)
            signal.raise_signal(signal.SIGINT)  # sets the flag; the step's end saves, then raises
        return real(self, step, steps, **kw)

    state_file = tmp_path / STATE_FILE
    monkeypatch.setattr(TrainingState, "end_of_step", ctrl_c_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(state_file)
    assert state_file.exists() and fired == [2]
    resumed, info = train(state_file)
    a, b = direct.state_dict(), resumed.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert info["final_loss"] == direct_info["final_loss"]


def test_a_state_of_another_training_is_refused(tmp_path, monkeypatch):
    """A saved state continues only the training it belongs to: another identity (steps, precision, ...) is one line
    naming the folder, and the state is kept."""
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    path = tmp_path / STATE_FILE
    with TrainingState(path, {"steps": 4}, modules={"net": net}, optimizers={"opt": opt}, generators={}) as ts:
        monkeypatch.setattr("flopmatch.trainstate.SAVE_EVERY_S", 0.0)
        ts.end_of_step(0, 4)
    before = path.read_bytes()
    with pytest.raises(UserError, match=r"holds an unfinished training of other settings or data; give the same"):
        with TrainingState(path, {"steps": 8}, modules={"net": net}, optimizers={"opt": opt}, generators={}):
            pass
    assert path.read_bytes() == before
