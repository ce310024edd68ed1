"""`tokenq iterate` end to end on a tiny model: round 0 (train Q, extract), round 1 (collect, retrain, extract), the
outputs, and a stopped run that resumes at the round it was in without losing or retraining a finished round."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tokenq.loop
from tokenq.cli import run
from tokenq.data import load_rows
from tokenq.tasks import get_task

TINY = ["--task", "arithmetic", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--bc_steps", "0", "--max_steps", "3",
        "--q_steps", "2", "--extract_steps", "2", "--collect_prompts", "8", "--eval_samples_per_prompt", "1",
        "--per_device_train_batch_size", "8", "--logging_steps", "1"]
ROUND_KEYS = {"round", "policy_reward", "guided_reward", "rows", "tokens_per_prompt", "kl_to_initial"}


def test_two_rounds_then_resume_after_a_stop(tmp_path, monkeypatch):
    out = tmp_path / "loop"
    first = run(["iterate", *TINY, "--rounds", "1", "--output_dir", str(out)])
    assert [r["round"] for r in first["rounds"]] == [0, 1] and ROUND_KEYS <= set(first["rounds"][1])
    assert first["rounds"][0]["rows"] == 4000 and first["rounds"][1]["rows"] == 4008  # 8 prompts x 1 sample added
    assert first["rounds"][0]["kl_to_initial"] == pytest.approx(first["rounds"][0]["kl_to_initial"])
    rollouts = load_rows(str(out / "round-1" / "rollouts.jsonl"))
    assert len(rollouts) == 8 and set(rollouts["round"]) == {1} and set(rollouts["policy"]) == {"round-0/policy"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"] == first["rounds"] and metrics["task"] == "arithmetic"
    assert (out / "reward_vs_round.png").stat().st_size > 0 and "| round |" in (out / "README.md").read_text()
    # the last round's policy is a plain causal LM that generates
    tokenizer = get_task("arithmetic").tokenizer()
    policy = AutoModelForCausalLM.from_pretrained(out / "policy")
    generated = policy.generate(**tokenizer(["1+2="], return_tensors="pt"), max_new_tokens=4, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, 9) or generated.shape[1] <= 9
    same = AutoModelForCausalLM.from_pretrained(out / "round-1" / "policy")
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), same.state_dict().values()))

    # a stop inside round 2 (after its collection and Q training): rounds 0-1 stay as they were, nothing is left behind
    finished = {r: (out / f"round-{r}" / "round.json").read_text() for r in (0, 1)}
    weights = (out / "round-1" / "q" / "tokenq_heads.safetensors").read_bytes()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenq.loop, "extract", stop)
    with pytest.raises(KeyboardInterrupt):
        run(["iterate", *TINY, "--rounds", "2", "--output_dir", str(out)])
    assert not (out / "round-2").exists() and not list(out.glob("_tokenq-tmp-*"))
    assert {r: (out / f"round-{r}" / "round.json").read_text() for r in (0, 1)} == finished
    monkeypatch.undo()

    resumed = run(["iterate", *TINY, "--rounds", "2", "--output_dir", str(out)])  # resumes at round 2
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2] and resumed["rounds"][:2] == first["rounds"]
    assert {r: (out / f"round-{r}" / "round.json").read_text() for r in (0, 1)} == finished
    assert (out / "round-1" / "q" / "tokenq_heads.safetensors").read_bytes() == weights  # not trained again
    assert resumed["rounds"][2]["rows"] == 4016
