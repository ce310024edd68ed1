"""A deployable policy from a trained critic: `tokenq extract CRITIC --method awr|best_of_n|dpo`.

    tokenq extract outputs/iql_arithmetic --config extract_arithmetic --method awr
    tokenq extract outputs/iql_arithmetic --task arithmetic --method dpo --output_dir outputs/extract_dpo
    tokenq extract CRITIC --dataset_name rows.jsonl --eval_split 0.05 --reward_fn reward.py:score --method best_of_n

CRITIC is a tokenq checkpoint (`tokenq iql` / `tokenq value`; a folder or Hub id), frozen throughout. The policy
starts from `--model_name_or_path` (LoRA with `--use_peft`), else from a copy of the critic's own LM. awr and
best_of_n train on the data's states (`--task`'s data, or your `--dataset_name` rows); dpo searches from its
prompts. When completions can be scored (a built-in task, or `--reward_fn` with held-out rows) the extracted
policy is sampled plainly on the held-out prompts, beside the policy it started from. Writes `OUTPUT_DIR/policy`
(a plain HF causal-LM folder with a card) and `OUTPUT_DIR/extract_metrics.json`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import set_seed
from trl import ModelConfig, TrlParser

from tokenq.data import DataArguments, load_training_data
from tokenq.evaluation import can_score, sweep
from tokenq.extraction import extract, save_policy, starting_policy
from tokenq.modeling import TokenQModel
from tokenq.outputs import claim_training_output
from tokenq.provenance import announce_settings
from tokenq.reporting import write_json
from tokenq.rollouts import policy_model, text_prompts
from tokenq.runner import builtin_configs, use_the_cores, with_config
from tokenq.trainers.base import TokenQTrainingArguments
from tokenq.trainers.extract import ExtractionArguments


@dataclass
class CriticArguments:
    critic: str | None = field(default=None, metadata={"help": "The trained critic (the first argument): folder or Hub id."})


def plain_reward(backbone, tokenizer, task, args: DataArguments, seed: int) -> dict:
    """Plain sampling (beta 0) of a causal LM on the task's held-out prompts: a `sweep` row."""
    return sweep(policy_model(backbone), tokenizer, task, [{"strategy": "sample", "beta": 0.0}],
                 args.eval_samples_per_prompt, seed, **args.filter_kwargs())[0]


def parse(argv: list[str] | None):
    user_argv = list(argv or [])
    if user_argv and not user_argv[0].startswith("-"):
        user_argv = ["--critic", user_argv[0], *user_argv[1:]]
    resolved = with_config(user_argv, "extract", None)
    classes = (CriticArguments, DataArguments, ExtractionArguments, TokenQTrainingArguments, ModelConfig)
    parsed = TrlParser(classes, allow_abbrev=False, prog="tokenq extract CRITIC").parse_args_and_config(resolved)
    announce_settings(user_argv, resolved, parsed, classes[:3], builtin_configs())
    if not parsed[0].critic:
        raise SystemExit("tokenq extract: give the trained critic (a tokenq checkpoint) as the first argument")
    return parsed


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    source, data_args, ex, train_args, model_args = parse(argv)
    if model_args.use_peft and not ex.merge_lora and not model_args.model_name_or_path:
        raise SystemExit("tokenq extract: --merge_lora false saves the LoRA adapter alone, whose base must be a model "
                         "anyone can load: start from --model_name_or_path (a Hub id or folder), or merge (the default)")
    claim_training_output(train_args, "extract")
    use_the_cores()
    set_seed(train_args.seed)
    critic = TokenQModel.from_pretrained(source.critic)
    data = load_training_data(data_args, replace(model_args, model_name_or_path=source.critic), train_args.max_length)
    task, tokenizer = data.task, data.tokenizer
    policy = starting_policy(critic, model_args)
    scored = can_score(task)
    before = plain_reward(policy, tokenizer, task, data_args, train_args.seed) if scored else None
    prompts = text_prompts(data.dataset)
    policy, facts = extract(policy, critic, tokenizer, data.dataset, train_args, ex, task=task, prompts=prompts)
    metrics = {"critic": source.critic, "method": ex.method, **facts, "task": getattr(task, "name", None)}
    if scored:
        after = plain_reward(policy, tokenizer, task, data_args, train_args.seed)
        metrics.update(policy_reward=after["reward"], start_reward=before["reward"], tokens_per_prompt=after["generated_tokens"],
                       policy_eval=after, behavior_reward=task.behavior_reward())
    out = Path(train_args.output_dir)
    results = {k: metrics[k] for k in ("policy_reward", "start_reward", "behavior_reward", "tokens_per_prompt") if k in metrics}
    save_policy(policy, tokenizer, out / "policy", source=source.critic, facts=facts, ex=ex, results=results)
    metrics["wall_time_s"] = time.time() - start
    write_json(out / "extract_metrics.json", metrics)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
    print(f"extracted a policy from {source.critic} by {ex.method}: {summary or 'not evaluated (no reward to score)'}; "
          f"wrote {out / 'policy'} and {out / 'extract_metrics.json'} ({metrics['wall_time_s']:.0f}s)")
    return metrics
