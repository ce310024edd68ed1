"""A critic for a given policy: Q♯'s roll-in / roll-out collection, the command that collects, trains and evaluates,
and the decoding commands with `--critic`."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, set_seed

from tokenq.cli import run
from tokenq.data import load_rows
from tokenq.mdp import tokenize_dataset
from tokenq.rollouts import policy_model, rollin_rows
from tokenq.tasks import get_task
from tests.conftest import fixed_advantage_model
from tests.test_bad_inputs import _snapshot


def test_rollin_then_rollout_rows(arithmetic_policy):
    """A critic that makes the steered policy write '7' at every step: each row's prompt is the prompt and h sevens
    (h uniform over the budget), its completion the policy's own roll-out of the rest of the budget; the reward
    scores the whole completion; the rows tokenize as outcome rows whose actions are the roll-out only."""
    task = get_task("arithmetic")
    tokenizer = task.tokenizer()
    seven = tokenizer.convert_tokens_to_ids("7")
    advantage = torch.zeros(len(tokenizer))
    advantage[seven] = 50.0
    critic = fixed_advantage_model(tokenizer, advantage)
    policy = policy_model(AutoModelForCausalLM.from_pretrained(arithmetic_policy))
    prompts = list(dict.fromkeys(task.dataset()["prompt"]))[:48]
    set_seed(0)
    rows, stats = rollin_rows(policy, tokenizer, task, prompts, task.max_new_tokens, {"critic": critic, "beta": 1.0}, True,
                              {"round": 1})
    assert len(rows) == len(prompts) and all(r["round"] == 1 for r in rows)
    rolled_in = [r["prompt"][len(p):] for r, p in zip(rows, prompts)]
    assert all(r["prompt"].startswith(p) and set(x) <= {"7"} for r, p, x in zip(rows, prompts, rolled_in))
    assert {len(x) for x in rolled_in} == set(range(task.max_new_tokens))  # h ~ U{0..budget-1}
    assert any(set(r["completion"]) - {"7"} for r in rows)  # the roll-out is the policy's own
    generated = [tokenizer(x + r["completion"], add_special_tokens=False).input_ids for x, r in zip(rolled_in, rows)]
    clean = tokenizer.batch_decode(generated, skip_special_tokens=True)  # the text the reward read
    assert [r["reward"] for r in rows] == task.score(prompts, clean)["reward"]
    assert all(len(ids) <= task.max_new_tokens for ids in generated) and (stats["generated_tokens"] <= task.max_new_tokens).all()
    assert {r["truncated"] for r in rows} == {True, False}
    tokenized = tokenize_dataset(Dataset.from_list(rows), tokenizer, max_length=64)
    for row, tok in zip(rows, tokenized):
        # the roll-out acts (and its EOS, when it ended: a cut roll-out is truncated); the roll-in is prompt
        rollout = tokenizer(row["completion"], add_special_tokens=False).input_ids
        assert sum(tok["action_mask"]) == len(rollout) + (0 if row["truncated"] else 1)
        assert tok["terminated"] == (not row["truncated"])


def test_collect_steered_by_a_critic_and_with_rollin(arithmetic_policy, arithmetic_critic, tmp_path):
    with pytest.raises(ValueError, match="--rollin true rolls in with the policy steered by --critic"):
        run(["collect", arithmetic_policy, "--task", "arithmetic", "--rollin", "true", "--output", str(tmp_path / "x.jsonl")])
    out = tmp_path / "rows.jsonl"
    rows = run(["collect", arithmetic_policy, "--task", "arithmetic", "--critic", arithmetic_critic, "--rollin", "true",
                "--beta", "2", "--max_prompts", "6", "--num_samples", "2", "--output", str(out)])
    assert 0 < len(rows) <= 12 and all("completion" in r and r["strategy"].startswith("rollin") for r in rows)
    assert len(load_rows(str(out))) == len(rows)
    steered = run(["collect", arithmetic_policy, "--task", "arithmetic", "--critic", arithmetic_critic, "--beta", "2",
                   "--max_prompts", "3", "--output", str(tmp_path / "steered.jsonl")])
    assert len(steered) == 3 and all("steps" in r for r in steered)  # this task's process rows, steered sampling


SMALL = ["--policy_bc_steps", "20", "--bc_steps", "10", "--max_steps", "10", "--collect_prompts", "24",
         "--collect_num_samples", "2", "--eval_samples_per_prompt", "1", "--eval_max_prompts", "12",
         "--eval_betas", "1", "16", "--eval_etas", "0.1", "1"]


@pytest.mark.slow
def test_a_critic_for_a_frozen_policy_end_to_end(tmp_path, capsys):
    """`tokenq value --config arithmetic_critic` (small): the behaviour clone as the policy, its rollouts (and one
    roll-in round), a critic under a quarter of its size trained on them, the policy plain and steered; a second run
    reuses the policy and the rollouts; the decoding commands take the pair."""
    out = tmp_path / "critic"
    metrics = run(["value", "--config", "arithmetic_critic", "--output_dir", str(out), "--rollin_rounds", "1", *SMALL])
    assert metrics["critic_parameters"] * 4 <= metrics["policy_parameters"] == 1_051_776
    assert {"plain_reward", "guided_reward", "guided_beta"} <= set(metrics) and metrics["guided_beta"] == 16
    assert [(r.get("beta"), r.get("eta")) for r in metrics["eval"]] == [(0, None), (1, None), (16, None), (None, 0.1), (None, 1)]
    assert all(r["critic_forward_passes"] > 0 for r in metrics["eval"])
    assert json.loads((out / "metrics.json").read_text())["guided_reward"] == metrics["guided_reward"]
    assert (out / "reward_vs_kl.png").is_file() and (out / "policy" / "config.json").is_file()
    said = metrics["verdict"]  # judged on the policy's own rollouts on the evaluation prompts (2 each)
    assert said["value"]["rows"] == 2 * len(metrics["eval"][0]["prompt_rewards"]) and isinstance(said["guidance_helps"], bool)
    first, rollin = load_rows(str(out / "rollouts.jsonl")), load_rows(str(out / "rollouts-1.jsonl"))
    assert len(first) == 48 and set(first["round"]) == {0} and set(rollin["round"]) == {1}
    assert metrics["rollouts"] == len(first) + len(rollin)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "rollouts.jsonl", out / "policy" / "model.safetensors")}
    finished = _snapshot(out)
    with pytest.raises(SystemExit, match=r"holds an earlier run's outputs .*--overwrite true"):  # the critic is not replaced
        run(["value", "--config", "arithmetic_critic", "--output_dir", str(out), *SMALL])
    assert _snapshot(out) == finished
    run(["value", "--config", "arithmetic_critic", "--output_dir", str(out), *SMALL, "--overwrite", "true"])
    assert "policy: reusing" in capsys.readouterr().out  # a new critic; the policy and its rollouts are reused
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    with pytest.raises(ValueError, match=r"holds rollouts of \['behaviour_clone'\], not of --policy"):
        run(["value", "--config", "arithmetic_critic", "--output_dir", str(out), *SMALL, "--policy", str(out / "policy"),
             "--overwrite", "true"])
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    rows = run(["generate", str(out / "policy"), "--critic", str(out), "--prompt", "1+2+3=", "--eta", "0.1",
                "--max_new_tokens", "6"])
    assert rows[0]["prompt"] == "1+2+3=" and rows[0]["generated_tokens"] > 0
    evaluated = run(["eval", str(out / "policy"), "--critic", str(out), "--task", "arithmetic", "--eval_etas", "0.1",
                     "--eval_samples_per_prompt", "1", "--eval_max_prompts", "8", "--output_dir", str(tmp_path / "eval")])
    assert [r["eta"] for r in evaluated] == [0.1] and Path(tmp_path / "eval" / "eval_metrics.json").is_file()
    swept = run(["sweep", str(out / "policy"), "--critic", str(out), "--task", "arithmetic", "--eval_strategies", "sample",
                 "best_of_n", "step_search", "--eval_betas", "4", "--eval_etas", "0.2", "--eval_samples_per_prompt", "1",
                 "--eval_max_prompts", "8", "--output_dir", str(tmp_path / "sweep")])
    assert [r["strategy"] for r in swept] == ["sample", "sample", "best_of_n", "step_search"]
    assert all(r["critic_forward_passes"] >= r["forward_passes"] > 0 for r in swept)
    scaled = run(["scale", str(out / "policy"), "--critic", str(out), "--task", "arithmetic", "--budgets", "1", "4",
                  "--eval_strategies", "dvts", "astar", "mcts", "--votes", "weighted", "--eval_samples_per_prompt", "1",
                  "--eval_max_prompts", "8", "--output_dir", str(tmp_path / "scale")])
    assert [(r["strategy"], r["budget"], r["vote"]) for r in scaled] == [
        ("dvts", 1, None), ("dvts", 1, "weighted"), ("dvts", 4, None), ("dvts", 4, "weighted"),
        ("astar", 1, None), ("astar", 4, None), ("mcts", 1, None), ("mcts", 4, None)]
    assert all(r["critic_forward_passes"] == r["forward_rows"] > 0 for r in scaled)  # the critic follows every policy row


def test_a_critic_for_a_policy_on_your_own_data_with_its_default_config(tmp_path, arithmetic_policy):
    """`tokenq value --policy MODEL` on a user's rows, held-out rows and reward function, nothing else: the critic's
    trainer has no held-out rows of the policy's own (the data's are another policy's returns), so it evaluates at
    the end, steering the policy, instead of crashing after the rollouts."""
    rows = [{"prompt": f"{a}+{b}=", "completion": str((a + b) % 10), "reward": 1.0} for a in range(10) for b in range(4)]
    held = [{"prompt": f"{a}+{b}=", "completion": "0", "reward": 0.0} for a in range(3) for b in range(4, 6)]
    (tmp_path / "reward.py").write_text("def right(prompts, completions):\n"
                                        "    return [float(c.strip() == str(sum(map(int, p[:-1].split('+'))) % 10))\n"
                                        "            for p, c in zip(prompts, completions)]\n")
    for name, data in (("rows", rows), ("held", held)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    out = tmp_path / "critic"
    metrics = run(["value", "--policy", arithmetic_policy, "--model_name_or_path", arithmetic_policy, "--dataset_name",
                   str(tmp_path / "rows.jsonl"), "--eval_dataset", str(tmp_path / "held.jsonl"), "--reward_fn",
                   f"{tmp_path / 'reward.py'}:right", "--max_steps", "4", "--collect_prompts", "8", "--collect_num_samples",
                   "1", "--eval_samples_per_prompt", "1", "--output_dir", str(out)])
    assert {"plain_reward", "guided_reward"} <= set(metrics) and len(load_rows(str(out / "rollouts.jsonl"))) == 8
    assert json.loads((out / "metrics.json").read_text())["guided_reward"] == metrics["guided_reward"]


def test_a_policy_with_another_tokenizer_is_refused_before_training(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=f"--policy {llama_dir}: its tokenizer is not the critic's"):
        run(["value", "--config", "arithmetic_critic", "--policy", llama_dir, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "rollouts.jsonl").exists()
