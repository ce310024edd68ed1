"""IQLTrainer: Polyak timing, logging, resume, errors before training."""

import pytest
import torch
from datasets import Dataset

from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.trainers import IQLConfig, IQLTrainer
from tests.conftest import tiny_gpt2

ROWS = [{"prompt": "ab", "completion": c, "reward": float(i % 2)} for i, c in enumerate(["cd", "ce", "dd", "de"] * 6)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                dataloader_pin_memory=False)
    base.update(kw)
    return IQLConfig(**base)


def test_polyak_once_per_optimizer_step_under_gradient_accumulation(tokenizer, tmp_path):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    calls, micro_batches = [], []
    update = model.update_targets
    model.update_targets = lambda alpha: (calls.append(alpha), update(alpha))
    trainer = IQLTrainer(model, _args(tmp_path, max_steps=6, gradient_accumulation_steps=3, target_update_interval=2,
                                      target_update_alpha=0.5), Dataset.from_list(ROWS), tokenizer)
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: (micro_batches.append(1), compute_loss(*a, **k))[1]
    trainer.train()
    assert len(micro_batches) == 18  # 6 optimiser steps x 3 micro-batches
    assert calls == [0.5] * 3  # every 2nd optimiser step: steps 2, 4, 6


def test_targets_follow_the_polyak_formula(tokenizer, tmp_path):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    target0 = [p.clone() for p in model.heads.target_q.parameters()]
    trainer = IQLTrainer(model, _args(tmp_path, max_steps=1, target_update_alpha=0.25, target_update_interval=1),
                         Dataset.from_list(ROWS), tokenizer)
    trainer.train()
    for p_bar, p, t0 in zip(model.heads.target_q.parameters(), model.heads.q.parameters(), target0):
        assert torch.allclose(p_bar, 0.25 * p + 0.75 * t0, atol=1e-7)


def test_loss_terms_are_logged_separately(tokenizer, tmp_path):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    trainer = IQLTrainer(model, _args(tmp_path, max_steps=2), Dataset.from_list(ROWS), tokenizer,
                         eval_dataset=Dataset.from_list(ROWS[:4]))
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss", "loss/q", "loss/v", "loss/cql", "loss/awac", "q/mean", "v/mean"):
        assert key in logged, key
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_loss/q" in metrics


def test_bad_row_fails_before_any_step_and_writes_nothing(tokenizer, tmp_path):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    rows = ROWS + [{"prompt": "a", "completion": "b", "reward": float("inf")}]
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"row 24: field 'reward'"):
        IQLTrainer(model, _args(out, max_steps=2), Dataset.from_list(rows), tokenizer)
    assert not out.exists()


def test_resume_from_checkpoint_is_exact(tokenizer, tmp_path):
    def run(out, resume=None, max_steps=4):
        model = TokenQModel(tiny_gpt2(len(tokenizer), seed=3), TokenQConfig())
        args = _args(out, max_steps=max_steps, save_strategy="steps", save_steps=2, target_update_alpha=0.3,
                     lr_scheduler_type="constant")
        trainer = IQLTrainer(model, args, Dataset.from_list(ROWS), tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a")
    run(tmp_path / "b", max_steps=2)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    sa, sb = straight.state_dict(), resumed.state_dict()
    worst = max((sa[k] - sb[k]).abs().max().item() for k in sa)
    assert worst < 1e-6


def test_resumed_logs_equal_the_uninterrupted_run(tokenizer, tmp_path):
    """Every logged term after a resume equals the uninterrupted run's, at every logged step (each log line divides
    by the steps run since the previous one, not by steps since a counter that restarts at 0)."""
    def run(out, resume=None):
        model = TokenQModel(tiny_gpt2(len(tokenizer), seed=3), TokenQConfig())
        args = _args(out, max_steps=6, save_strategy="steps", save_steps=2, logging_steps=1, lr_scheduler_type="constant")
        trainer = IQLTrainer(model, args, Dataset.from_list(ROWS), tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h for h in trainer.state.log_history if "loss/q" in h}

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-2 from the checkpoint's trainer_state.json
    for step in (3, 4, 5, 6):
        terms = {k for k in straight[step] if k.startswith(("loss", "q/", "v/"))}
        assert terms >= {"loss", "loss/q", "loss/v", "loss/cql", "loss/awac"}
        assert {k: resumed[step][k] for k in terms} == {k: straight[step][k] for k in terms}, step


def test_model_card_records_the_reward_normalisation(tokenizer, tmp_path):
    """With --reward_normalization the heads learn normalised returns: the card says how to map them back."""
    from tokenq.mdp import normalize_rewards, tokenize_dataset

    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    trainer = IQLTrainer(model, _args(tmp_path, max_steps=1, reward_normalization="zscore"), Dataset.from_list(ROWS), tokenizer)
    _, stats = normalize_rewards(tokenize_dataset(Dataset.from_list(ROWS), tokenizer, max_length=1024), "zscore")
    returns = torch.tensor([r["reward"] for r in ROWS], dtype=torch.float64)  # 0/1, 12 of each: std 0.5107
    assert stats["scale"] == pytest.approx(1 / returns.std().item()) and stats["shift"] == pytest.approx(-0.5 * stats["scale"])
    training = trainer.model_card_kwargs()["training"]
    assert training["reward_normalization"] == "zscore"
    assert (training["reward_scale"], training["reward_shift"]) == (stats["scale"], stats["shift"])
    plain = IQLTrainer(model, _args(tmp_path, max_steps=1, reward_normalization="none"), Dataset.from_list(ROWS), tokenizer)
    assert "reward_scale" not in plain.model_card_kwargs()["training"]


def test_guided_evaluation_leaves_the_training_random_streams_alone(tokenizer):
    """The learning-curve evaluation seeds its sampling; the training after it must draw what it would have drawn."""
    import random

    import numpy as np

    from tokenq import GuidedEval
    from tokenq.tasks import get_task

    task = get_task("randomwalks", n_walks=10)
    model = TokenQModel(tiny_gpt2(len(task.tokenizer())), TokenQConfig())
    evaluate = GuidedEval(task.tokenizer(), task, beta=4.0, samples_per_prompt=1, seed=0, top_k=5)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    assert 0.0 <= evaluate(model)["reward"] <= 1.0
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]


def test_head_learning_rate_puts_the_heads_in_groups_of_their_own(tokenizer, tmp_path):
    """Fresh heads at head_learning_rate, the (pretrained) backbone at learning_rate, both under the scheduler."""
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    trainer = IQLTrainer(model, _args(tmp_path, max_steps=1, learning_rate=1e-5, head_learning_rate=1e-2, weight_decay=0.1,
                                      lr_scheduler_type="constant"), Dataset.from_list(ROWS), tokenizer)
    optimizer = trainer.create_optimizer()
    heads = {id(p) for p in model.heads.parameters()}
    by_rate = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_rate.setdefault((group["lr"], group["weight_decay"]), set()).add(id(p) in heads)
    assert by_rate == {(1e-5, 0.1): {False}, (1e-5, 0.0): {False}, (1e-2, 0.1): {True}, (1e-2, 0.0): {True}}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    trainer.create_scheduler(1, optimizer)
    assert [g["lr"] for g in optimizer.param_groups if id(g["params"][0]) in heads] == [1e-2, 1e-2]


def test_a_new_objective_on_the_exported_base_trainer(tokenizer, tmp_path):
    """README's example: a new objective is a `compute_loss` on `tokenq.TokenQTrainer` (data preparation,
    token-exact normalisation, logging, checkpoints and diagnostics come from the base)."""
    from tokenq import TokenQTrainer, TokenQTrainingArguments, discounted_returns, mc_value_loss

    class MonteCarloV(TokenQTrainer):
        objective = "Monte-Carlo V (an example)"

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(inputs["input_ids"], inputs["attention_mask"], inputs["action_mask"], heads="value", lm_logits=False)
            acting = inputs["action_mask"].bool()
            g_t = discounted_returns(inputs["rewards"], inputs["action_mask"], self.args.gamma)[acting]
            loss = mc_value_loss(out.values[acting], g_t, num_items=num_items_in_batch)
            self.record(model, loss__v=loss)
            return self.global_scale(loss, num_items_in_batch)

    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig(freeze_backbone=True))
    args = TokenQTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=30, learning_rate=1e-2,
                                   per_device_train_batch_size=8, logging_steps=10, save_strategy="no", disable_tqdm=True)
    trainer = MonteCarloV(model, args, Dataset.from_list(ROWS), tokenizer, eval_dataset=Dataset.from_list(ROWS))
    trainer.train()
    losses = [h["loss/v"] for h in trainer.state.log_history if "loss/v" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert trainer.value_diagnostics()["rows"] == len(ROWS)
