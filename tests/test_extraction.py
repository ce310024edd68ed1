"""Policy extraction from a frozen critic: AWR and best-of-N trainers on a fixed-advantage critic (where the right
answer is known), the DPO pairs of a fixed search tree, the extracted folder as a plain causal LM, `tokenq extract`."""

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tokenq.cli import run
from tokenq.extraction import first_step, preference_pairs, save_policy, scored_steps, step_states
from tokenq.trainers.base import TokenQTrainingArguments
from tokenq.trainers.extract import AWRTrainer, BestOfNTrainer, ExtractionArguments
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.tasks import get_task
from tests.conftest import fixed_advantage_model, tiny_gpt2


def args(tmp_path, steps: int, lr: float = 1e-2) -> TokenQTrainingArguments:
    return TokenQTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=16,
                                   learning_rate=lr, report_to="none", save_strategy="no", disable_tqdm=True,
                                   logging_steps=1000, seed=0, dataloader_pin_memory=False)


def prob_of(policy, tokenizer, prompt: str, tokens: str) -> list[float]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        probs = torch.softmax(policy(input_ids=ids).logits[0, -1].float(), -1)
    return [probs[tokenizer.convert_tokens_to_ids(t)].item() for t in tokens]


def advantage(tokenizer, values: dict[str, float]) -> torch.Tensor:
    adv = torch.zeros(len(tokenizer))
    for token, value in values.items():
        adv[tokenizer.convert_tokens_to_ids(token)] = value
    return adv


def test_awr_extracts_data_frequency_times_exp_advantage(tokenizer, tmp_path):
    """Data: half 'x', half 'y' after the prompt 'a'; A(x) - A(y) = T ln 3. AWR's minimiser is
    pi(a) ~ data(a) exp(A(a) / T): pi(x) = 0.75, pi(y) = 0.25."""
    temperature = 0.2
    critic = fixed_advantage_model(tokenizer, advantage(tokenizer, {"x": temperature * math.log(3.0)}))
    rows = Dataset.from_list([{"prompt": "a", "completion": c, "reward": 0.0} for c in "xy" * 32])
    policy = tiny_gpt2(len(tokenizer), seed=1)
    ex = ExtractionArguments(method="awr", awr_temperature=temperature)
    trainer = AWRTrainer(TokenQModel(policy, TokenQConfig()), args(tmp_path, 150), rows, tokenizer, critic=critic, extraction=ex)
    trainer.train()
    px, py = prob_of(policy, tokenizer, "a", "xy")
    assert px == pytest.approx(0.75, abs=0.04) and py == pytest.approx(0.25, abs=0.04)
    assert all(not p.requires_grad for p in critic.parameters())  # the critic stays frozen


def test_best_of_n_extraction_learns_the_argmax_q_candidate(tokenizer, tmp_path):
    """A critic ranking x > y > everything else: at each state the best of 4 policy samples is the target, so the
    policy moves its mass onto x (from 1/V at the start), whatever the data's own action was."""
    critic = fixed_advantage_model(tokenizer, advantage(tokenizer, {"x": 2.0, "y": 1.0}))
    rows = Dataset.from_list([{"prompt": "a", "completion": c, "reward": 0.0} for c in "qrstuvwz" * 8])
    policy = tiny_gpt2(len(tokenizer), seed=1)
    before = prob_of(policy, tokenizer, "a", "x")[0]
    ex = ExtractionArguments(method="best_of_n", num_candidates=4)
    trainer = BestOfNTrainer(TokenQModel(policy, TokenQConfig()), args(tmp_path, 60), rows, tokenizer, critic=critic,
                             extraction=ex)
    trainer.train()
    assert before < 0.1 and prob_of(policy, tokenizer, "a", "x")[0] > 0.9


def test_dpo_pairs_of_a_fixed_search_tree():
    """Two nodes: the root (three continuations) and, from its best first step, a node whose candidates tie."""
    nodes = [
        {"prompt": "1+2=", "prefix": "", "candidates": [{"completion": "1;3", "score": 0.9},
                                                       {"completion": "5;0", "score": -1.0},
                                                       {"completion": "1;4", "score": 0.2}]},
        {"prompt": "1+2=", "prefix": "1;", "candidates": [{"completion": "3", "score": 0.5}, {"completion": "3", "score": 0.5}]},
        {"prompt": "3+3=", "prefix": "3;", "candidates": [{"completion": "7", "score": 0.0}, {"completion": "6", "score": 1.0}]},
    ]
    assert preference_pairs(nodes) == [
        {"prompt": "1+2=", "chosen": "1;3", "rejected": "5;0"},
        {"prompt": "3+3=3;", "chosen": "6", "rejected": "7"},  # the tie at "1+2=1;" gives no pair
    ]
    assert first_step("1;3;4", [";"]) == ("1;", False) and first_step("4", [";"]) == ("4", True)
    assert first_step("ab", None) == ("ab", True)  # no step strings: a rollout is one step


def test_step_candidates_start_at_every_step_boundary_of_the_data(tokenizer):
    process = Dataset.from_list([{"prompt": "1+2=", "steps": ["1;", "3"], "step_rewards": [1.0, 1.0], "reward": 1.0},
                                 {"prompt": "1+2=", "steps": ["1;", "4"], "step_rewards": [1.0, 0.0], "reward": 0.0}])
    assert step_states(process) == [("1+2=", ""), ("1+2=", "1;")]  # distinct states only
    outcome = Dataset.from_list([{"prompt": "ab", "completion": "cd", "reward": 1.0}])
    assert step_states(outcome) == [("ab", "")]  # outcome rows: the step is the whole completion
    chat = Dataset.from_list([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(ValueError, match="outcome or process rows, not 'chat'"):
        step_states(chat)
    # a step that ends its completion is scored with its EOS (where an outcome reward sits)
    assert scored_steps(["1;3", "4"], [";"], tokenizer) == ["1;", "4" + tokenizer.eos_token]


def test_extraction_arguments_refuse_bad_values():
    with pytest.raises(ValueError, match="--method must be one of"):
        ExtractionArguments(method="ppo")
    with pytest.raises(ValueError, match="--awr_temperature must be > 0"):
        ExtractionArguments(awr_temperature=0.0)
    with pytest.raises(ValueError, match="--num_candidates must be >= 2 for best_of_n"):
        ExtractionArguments(method="best_of_n", num_candidates=1)
    with pytest.raises(ValueError, match="--candidate must be token or step"):
        ExtractionArguments(candidate="word")
    with pytest.raises(ValueError, match="--rank_by must be value or reward"):
        ExtractionArguments(rank_by="vibes")


def test_a_frozen_policy_is_refused(tokenizer, tmp_path):
    critic = fixed_advantage_model(tokenizer, torch.zeros(len(tokenizer)))
    frozen = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig(freeze_backbone=True))
    rows = Dataset.from_list([{"prompt": "a", "completion": "b", "reward": 0.0}])
    with pytest.raises(ValueError, match="no trainable weights"):
        AWRTrainer(frozen, args(tmp_path, 1), rows, tokenizer, critic=critic, extraction=ExtractionArguments())


def test_saved_policy_is_a_plain_causal_lm_that_generates(tokenizer, tmp_path):
    policy = tiny_gpt2(len(tokenizer))
    folder = save_policy(policy, tokenizer, tmp_path / "policy", source="critic-dir", facts={"steps": 3},
                         ex=ExtractionArguments(), results={"policy_reward": 0.5})
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    out = loaded.generate(**tokenizer("ab", return_tensors="pt"), max_new_tokens=4, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] >= 3
    assert torch.equal(loaded.transformer.wte.weight, policy.transformer.wte.weight)
    card = (folder / "README.md").read_text()
    assert "critic-dir" in card and "awr" in card and "policy_reward" in card
    assert not list(tmp_path.glob("_tokenq-tmp-*"))


EXTRACT = ["--task", "arithmetic", "--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_samples_per_prompt", "1",
           "--eval_max_prompts", "16", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]


SLOW = pytest.mark.slow


@pytest.mark.parametrize("method, extra", [("awr", []), pytest.param("best_of_n", [], marks=SLOW), pytest.param("dpo", [], marks=SLOW),
                                           pytest.param("dpo", ["--xpo_alpha", "0.1"], marks=SLOW),
                                           pytest.param("best_of_n", ["--candidate", "step"], marks=SLOW)])
def test_tokenq_extract_writes_a_loadable_policy_and_its_scores(arithmetic_critic, tmp_path, method, extra):
    out = tmp_path / method
    metrics = run(["extract", arithmetic_critic, *EXTRACT, "--method", method, "--dpo_prompts", "4", *extra,
                   "--output_dir", str(out)])
    assert metrics["method"] == method and 0 <= metrics["policy_reward"] <= 1 and metrics["tokens_per_prompt"] > 0
    assert metrics["pairs" if method == "dpo" else "steps"] > 0
    saved = json.loads((out / "extract_metrics.json").read_text())
    assert saved["policy_reward"] == metrics["policy_reward"]
    record = json.loads((out / "policy" / "extraction.json").read_text())
    assert record["extracted_from"] == arithmetic_critic and record["extraction"]["method"] == method
    AutoModelForCausalLM.from_pretrained(out / "policy")


@pytest.mark.slow
def test_extract_with_lora_merged_or_as_an_adapter(arithmetic_critic, arithmetic_policy, tmp_path):
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
    run(["extract", arithmetic_critic, *EXTRACT, *lora, "--output_dir", str(tmp_path / "merged")])
    assert not (tmp_path / "merged" / "policy" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "policy")
    with pytest.raises(SystemExit, match="--merge_lora false saves the LoRA adapter alone"):
        run(["extract", arithmetic_critic, *EXTRACT, *lora, "--merge_lora", "false", "--output_dir", str(tmp_path / "x")])
    run(["extract", arithmetic_critic, *EXTRACT, *lora, "--merge_lora", "false", "--model_name_or_path", arithmetic_policy,
         "--output_dir", str(tmp_path / "adapter")])
    assert (tmp_path / "adapter" / "policy" / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "policy")  # base + adapter, by transformers' PEFT integration


@pytest.mark.slow
def test_dpo_ranked_by_your_reward_on_your_rows(arithmetic_critic, tmp_path):
    """--rank_by reward with a user's rows and reward function (rollouts of different lengths score differently)."""
    rows = [{"prompt": f"{a}+{b}=", "completion": str((a + b) % 10), "reward": 1.0} for a in range(4) for b in range(4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "reward.py").write_text("def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    metrics = run(["extract", arithmetic_critic, "--dataset_name", str(tmp_path / "rows.jsonl"), "--eval_split", "0.25",
                   "--reward_fn", f"{tmp_path / 'reward.py'}:length", "--eval_max_new_tokens", "4", "--method", "dpo",
                   "--rank_by", "reward", "--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_samples_per_prompt",
                   "1", "--report_to", "none", "--dataloader_pin_memory", "false", "--output_dir", str(tmp_path / "out")])
    assert metrics["pairs"] > 0 and metrics["task"] is not None
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "policy")
