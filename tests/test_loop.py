"""`tokenq iterate` end to end on a tiny model: round 0 (train Q, extract), round 1 (collect, retrain, extract), the
outputs, and a stopped run that resumes at the round it was in without losing or retraining a finished round."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import tokenq.loop
from tokenq.cli import run
from tests.test_bad_inputs import _snapshot
from tokenq.data import load_rows
from tokenq.mdp import tokenize_dataset
from tokenq.tasks import get_task

TINY = ["--task", "arithmetic", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--bc_steps", "0", "--max_steps", "3",
        "--q_steps", "2", "--extract_steps", "2", "--collect_prompts", "8", "--eval_samples_per_prompt", "1",
        "--per_device_train_batch_size", "8", "--logging_steps", "1"]
ROUND_KEYS = {"round", "policy_reward", "guided_reward", "rows", "tokens_per_prompt", "kl_to_initial"}


@pytest.mark.slow
def test_two_rounds_then_resume_after_a_stop(tmp_path, monkeypatch):
    out = tmp_path / "loop"
    first = run(["iterate", *TINY, "--rounds", "1", "--output_dir", str(out)])
    assert [r["round"] for r in first["rounds"]] == [0, 1] and ROUND_KEYS <= set(first["rounds"][1])
    assert first["rounds"][0]["rows"] == 4000 and first["rounds"][1]["rows"] == 4008  # 8 prompts x 1 sample added
    assert all(math.isfinite(r["kl_to_initial"]) and r["tokens_per_prompt"] > 0 for r in first["rounds"])
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
    assert generated.shape[0] == 1 and 4 < generated.shape[1] <= 8  # the prompt's 4 tokens and 1-4 new ones
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


@pytest.mark.slow
def test_iterate_on_your_own_data_and_reward(tmp_path, llama_dir):
    """Nothing special to a built-in task: your rows, your reward function, the default config for your data."""
    rows = [{"prompt": p, "completion": c, "reward": float(c.startswith("a"))}
            for p in ("xy", "yz", "zx", "xx", "yy", "zz", "xz", "yx") for c in ("ab", "ba")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "reward.py").write_text("def score(prompts, completions):\n    return [float(c.startswith('a')) for c in completions]\n")
    metrics = run(["iterate", "--model_name_or_path", llama_dir, "--dataset_name", str(tmp_path / "rows.jsonl"),
                   "--eval_split", "0.25", "--reward_fn", f"{tmp_path / 'reward.py'}:score", "--max_steps", "2", "--q_steps", "1",
                   "--extract_steps", "1", "--rounds", "1", "--eval_samples_per_prompt", "1", "--eval_max_new_tokens", "3",
                   "--per_device_train_batch_size", "4", "--max_length", "32", "--output_dir", str(tmp_path / "loop")])
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    assert metrics["rounds"][1]["rows"] == 12 + 6 * 2  # 6 training prompts x 2 samples (configs/iterate_dataset.yaml)
    added = load_rows(str(tmp_path / "loop" / "round-1" / "rollouts.jsonl"))
    assert added.column_names == ["prompt", "completion", "reward", "truncated", "round", "policy", "strategy"]


@pytest.mark.slow
def test_a_rerun_continues_only_with_the_same_settings_and_rows_say_where_the_policy_stopped(tmp_path):
    out = tmp_path / "loop"
    run(["iterate", *TINY, "--rounds", "0", "--output_dir", str(out)])
    record = json.loads((out / "round-0" / "round.json").read_text())
    assert record["settings"]["training.learning_rate"] > 0 and record["settings"]["extraction.method"] == "awr"
    said = record["verdict"]  # the round's Q on the task's held-out rows; guided against plain sampling of its LM
    assert isinstance(said["value_learned"], bool) and said["guidance"]["configurations"] == 1 and said["message"]
    finished = _snapshot(out)
    for changed, name in ((["--learning_rate", "0.5"], "learning_rate"), (["--q_steps", "5"], "q_steps"),
                          (["--method", "best_of_n"], "method")):
        with pytest.raises(ValueError, match=rf"holds rounds made with other settings \({name}: .*only --rounds may change"):
            run(["iterate", *TINY, "--rounds", "1", *changed, "--output_dir", str(out)])
        assert _snapshot(out) == finished
    more = run(["iterate", *TINY, "--rounds", "1", "--output_dir", str(out)])  # more rounds: the same settings
    assert [r["round"] for r in more["rounds"]] == [0, 1] and (out / "round-0" / "round.json").read_bytes() == finished[
        "round-0/round.json"]
    # collected rows round-trip: a completion cut at the budget is a truncated episode, one that ended is terminated
    rows = load_rows(str(out / "round-1" / "rollouts.jsonl"))
    tokenizer = get_task("arithmetic").tokenizer()
    tokenized = tokenize_dataset(rows, tokenizer, max_length=64)
    assert True in rows["truncated"]
    for row, tok in zip(rows, tokenized):
        generated = sum(len(tokenizer(s, add_special_tokens=False).input_ids) for s in row["steps"])
        assert row["truncated"] == (generated == get_task("arithmetic").max_new_tokens)
        assert tok["terminated"] == (not row["truncated"])
    restarted = run(["iterate", *TINY, "--rounds", "0", "--learning_rate", "0.002", "--overwrite", "true",
                     "--output_dir", str(out)])
    assert [r["round"] for r in restarted["rounds"]] == [0] and not (out / "round-1").exists()
