"""Divergence is an error, not a checkpoint: non-finite losses / gradients stop training before anything is
saved (or are skipped, within `max_nonfinite_steps`), and a checkpoint with non-finite weights is refused."""

import math

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from tests.conftest import tiny_gpt2
from tests.test_trainers import ROWS, _args
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.trainers import IQLTrainer
from tokenq.trainers.guard import TrainingDiverged


class NaNAtStep(IQLTrainer):
    """IQL whose CQL term is NaN during the given optimiser steps (1-based)."""

    nan_steps: tuple[int, ...] = ()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training and self.state.global_step + 1 in self.nan_steps:
            self._step["loss/cql"][-1] = torch.tensor(float("nan"))
            loss = loss * float("nan")
        return loss


def test_a_diverging_run_stops_before_saving_anything(tokenizer, tmp_path):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    trainer = IQLTrainer(model, _args(tmp_path, max_steps=5, learning_rate=1e6, save_strategy="steps", save_steps=1),
                         Dataset.from_list(ROWS), tokenizer)
    with pytest.raises(TrainingDiverged, match=r"diverged at optimiser step \d.*non-finite.*Try: lower --learning_rate") as e:
        trainer.train()
    assert "loss/" in str(e.value) or "gradients of" in str(e.value) or "refusing to save" in str(e.value)
    for checkpoint in tmp_path.glob("checkpoint-*"):  # whatever was saved before the divergence is finite
        for file in checkpoint.glob("*.safetensors"):
            assert all(t.isfinite().all() for t in load_file(file).values()), file
    finite = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["loss"] != 0 and math.isfinite(h["loss"]) for h in finite)


def test_the_error_names_the_step_and_the_term_and_nothing_changes(tokenizer, tmp_path):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    trainer = NaNAtStep(model, _args(tmp_path, max_steps=4), Dataset.from_list(ROWS), tokenizer)
    trainer.nan_steps = (3,)
    with pytest.raises(TrainingDiverged, match=r"optimiser step 3: non-finite \(NaN / inf\) loss term\(s\) loss/cql, loss; gradients of") as e:
        trainer.train()
    assert "Last finite logged values: {" in str(e.value) and "'loss/q'" in str(e.value)
    assert trainer.state.global_step == 2 and all(p.isfinite().all() for p in model.parameters())


def test_max_nonfinite_steps_skips_bad_batches_and_logs_only_good_ones(tokenizer, tmp_path):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    trainer = NaNAtStep(model, _args(tmp_path, max_steps=5, max_nonfinite_steps=2), Dataset.from_list(ROWS), tokenizer)
    trainer.nan_steps = (2, 3)
    weights = {}

    def snapshot(name):
        weights[name] = [p.detach().clone() for p in model.heads.q.parameters()]

    from transformers import TrainerCallback

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshot(state.global_step)

    trainer.add_callback(Snap())
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[3]))  # steps 2, 3 changed no weight
    assert not all(torch.equal(a, b) for a, b in zip(weights[3], weights[4]))
    logs = {h["step"]: h for h in trainer.state.log_history if "loss/q" in h or "skipped_steps" in h}
    assert logs[2]["skipped_steps"] == 1 and "loss" not in logs[2] and "loss/q" not in logs[2]
    assert all(math.isfinite(logs[s]["loss"]) and logs[s]["loss"] > 0 for s in (1, 4, 5))
    assert all(p.isfinite().all() for p in model.parameters())

    trainer = NaNAtStep(TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig()),
                        _args(tmp_path / "b", max_steps=5, max_nonfinite_steps=1), Dataset.from_list(ROWS), tokenizer)
    trainer.nan_steps = (2, 3)
    with pytest.raises(TrainingDiverged, match=r"step 3: .*already skipped 1 step\(s\), --max_nonfinite_steps 1"):
        trainer.train()


def test_a_save_of_nonfinite_weights_is_refused(tokenizer, tmp_path):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    trainer = IQLTrainer(model, _args(tmp_path, max_steps=1), Dataset.from_list(ROWS), tokenizer)
    with torch.no_grad():
        next(model.heads.v.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"refusing to save .*heads\.v"):
        trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file", ["tokenq_heads.safetensors", "model.safetensors"])
def test_a_checkpoint_with_nonfinite_weights_is_refused_at_load(tokenizer, tmp_path, file):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    tensors = load_file(tmp_path / file)
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, tmp_path / file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{file}.*non-finite.*{name.split('.')[-1]}"):
        TokenQModel.from_pretrained(tmp_path)
    fresh = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    with pytest.raises(ValueError, match=rf"{file}.*non-finite"):
        fresh.load_checkpoint_weights(tmp_path)
