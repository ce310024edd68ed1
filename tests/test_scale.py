"""Token-exact objectives: one optimiser step on 8 rows of different lengths gives the same weights
whether the 8 rows come as one batch, 4 x 2 accumulated micro-batches or 2 x 4; logged terms are the
global-batch values."""

import pytest
from datasets import Dataset

from tests.conftest import tiny_gpt2
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.trainers import DQOConfig, DQOTrainer, IQLConfig, IQLTrainer, ValueConfig, ValueTrainer

# 8 rows whose action counts differ so much that no split into micro-batches balances them
LENGTHS = [1, 1, 2, 1, 12, 1, 3, 1]
ROWS = [{"prompt": "ab"[: 1 + i % 2], "completion": ("cdefghijklmn" * 2)[i : i + n], "reward": float(i % 3 == 0)}
        for i, n in enumerate(LENGTHS)]

TRAINERS = {
    "iql": (IQLTrainer, IQLConfig, {"cql_scale": 0.1, "awac_scale": 1.0}),
    "value": (ValueTrainer, ValueConfig, {"train_q": True, "bc_scale": 0.5}),
    "dqo": (DQOTrainer, DQOConfig, {}),
}


def one_step(tokenizer, tmp_path, objective: str, batch: int, accumulation: int, **overrides):
    trainer_cls, config_cls, extra = TRAINERS[objective]
    model = TokenQModel(tiny_gpt2(len(tokenizer), seed=5), TokenQConfig())
    args = config_cls(output_dir=str(tmp_path / f"{objective}-{batch}x{accumulation}"), report_to="none", use_cpu=True,
                      per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                      optim="sgd", learning_rate=1.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                      disable_tqdm=True, seed=0, dataloader_pin_memory=False, **{**extra, **overrides})
    trainer = trainer_cls(model, args, Dataset.from_list(ROWS), tokenizer)
    trainer.train()
    return model, trainer.state.log_history[0]


@pytest.mark.parametrize("objective", ["iql", "value", "dqo"])
def test_gradient_accumulation_equals_the_big_batch(tokenizer, tmp_path, objective):
    start = TokenQModel(tiny_gpt2(len(tokenizer), seed=5), TokenQConfig()).state_dict()
    big, big_log = one_step(tokenizer, tmp_path, objective, 8, 1)
    moved = max((big.state_dict()[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # the step is not trivially small
    for batch, accumulation in ((4, 2), (2, 4)):
        split, split_log = one_step(tokenizer, tmp_path, objective, batch, accumulation)
        worst = max((big.state_dict()[k] - v).abs().max().item() for k, v in split.state_dict().items())
        assert worst <= 1e-6, (batch, accumulation, worst)
        for key, value in big_log.items():
            if key.startswith(("loss", "q/", "v/", "logratio", "weight", "return")):
                assert split_log[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
