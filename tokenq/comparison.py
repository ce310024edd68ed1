"""One behaviour dataset, every method: behaviour cloning, ILQL, Monte-Carlo values with search, DQO, DPO
and search on DPO's implicit Q, each scored by the task's held-out accuracy (`recipes/compare.py`)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import AutoModelForCausalLM, set_seed
from trl import DPOConfig, DPOTrainer

from tokenq.data import outcome_only
from tokenq.evaluation import search_configs, sweep
from tokenq.implicit import implicit_q_generate
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.sft import behaviour_cloning, restore_forward
from tokenq.tasks import get_task
from tokenq.trainers import DQOConfig, DQOTrainer, IQLConfig, IQLTrainer, ValueConfig, ValueTrainer


@dataclass
class CompareArguments:
    """The comparison: task, shared tiny model, and the budget of every method."""

    task: str = field(default="arithmetic", metadata={"help": "Built-in task with a held-out metric."})
    output_dir: str = field(default="outputs/compare_arithmetic", metadata={"help": "Checkpoints and compare_metrics.json."})
    seed: int = field(default=0, metadata={"help": "Seed of every training run and evaluation."})
    n_layer: int = field(default=4, metadata={"help": "Layers of the tiny model every method starts from."})
    n_embd: int = field(default=128, metadata={"help": "Width of that model."})
    n_head: int = field(default=4, metadata={"help": "Its attention heads."})
    batch_size: int = field(default=64, metadata={"help": "Training batch size of every method."})
    bc_steps: int = field(default=1000, metadata={"help": "Behaviour cloning (trl SFTTrainer) steps."})
    bc_lr: float = field(default=3e-3, metadata={"help": "Behaviour cloning learning rate."})
    ilql_steps: int = field(default=600, metadata={"help": "ILQL steps (from the BC model, full fine-tuning)."})
    eval_betas: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0], metadata={"help": "ILQL's guidance strengths tried."})
    mc_steps: int = field(default=600, metadata={"help": "Monte-Carlo value steps."})
    mc_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the Monte-Carlo value run."})
    mc_loss: str = field(
        default="mse", metadata={"help": "mse: returns of outcome + process rewards (PRM-style); bce: the 0/1 outcome only."}
    )
    mc_frozen: bool = field(
        default=True,
        metadata={"help": "Heads on the frozen BC model (False: train its trunk too, keeping the BC loss)."},
    )
    num_continuations: int = field(default=4, metadata={"help": "K continuations per step (step search)."})
    num_candidates: int = field(default=4, metadata={"help": "N candidates (best-of-N)."})
    dqo_steps: int = field(default=600, metadata={"help": "DQO steps (from the BC model, full fine-tuning)."})
    dqo_beta: float = field(default=1.0, metadata={"help": "DQO's KL strength."})
    dpo_steps: int = field(default=600, metadata={"help": "DPO steps (trl DPOTrainer, from the BC model)."})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO's beta (also the implicit reward scale)."})
    lr: float = field(default=5e-4, metadata={"help": "Learning rate of ILQL, DQO and DPO."})
    eval_samples: int = field(default=2, metadata={"help": "Decodes per held-out prompt."})


def _train_kwargs(args: CompareArguments, out: Path, name: str, steps: int, lr: float) -> dict:
    return dict(output_dir=str(out / name), max_steps=steps, per_device_train_batch_size=args.batch_size,
                learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=min(50, steps // 10), seed=args.seed,
                report_to="none", save_strategy="no", logging_steps=100, disable_tqdm=True, dataloader_pin_memory=False)


def mean_reward(model, tokenizer, task, args, **config) -> float:
    """The task's mean reward of one decoding configuration on the held-out prompts."""
    return sweep(model, tokenizer, task, [config], args.eval_samples, args.seed)[0]["reward"]


def train_behaviour_policy(args, task, tokenizer, data, out: Path):
    set_seed(args.seed)
    backbone = AutoModelForCausalLM.from_config(task.model_config(tokenizer, args.n_layer, args.n_embd, args.n_head))
    behaviour_cloning(backbone, tokenizer, data, str(out / "bc_run"), max_steps=args.bc_steps, batch_size=args.batch_size,
                      learning_rate=args.bc_lr, seed=args.seed, disable_tqdm=True, logging_steps=200)
    backbone.save_pretrained(out / "bc")
    tokenizer.save_pretrained(out / "bc")
    return backbone.eval()


def run_ilql(args, task, tokenizer, data, bc, out: Path) -> dict[str, float]:
    set_seed(args.seed)
    model = TokenQModel(copy.deepcopy(bc), TokenQConfig())
    config = IQLConfig(**_train_kwargs(args, out, "ilql", args.ilql_steps, args.lr), tau=0.8, gamma=1.0, cql_scale=0.1,
                       reward_normalization="none", target_update_alpha=0.1, target_update_interval=5, max_length=64)
    IQLTrainer(model, config, data, tokenizer).train()
    model.save_pretrained(out / "ilql", tokenizer=tokenizer)
    return {b: mean_reward(model, tokenizer, task, args, strategy="sample", beta=b) for b in args.eval_betas}


def run_monte_carlo(args, task, tokenizer, data, bc, out: Path) -> dict[str, float]:
    """V and Q-probe heads on the returns (MSE on outcome + process rewards, or BCE on the outcome) of the
    frozen BC model (`mc_frozen`; otherwise its trunk trains too, keeping the BC loss so that it stays
    pi_beta); step search and best-of-N with plain pi_beta candidates, ranked by value score."""
    set_seed(args.seed)
    model = TokenQModel(copy.deepcopy(bc), TokenQConfig(freeze_backbone=args.mc_frozen))
    config = ValueConfig(**_train_kwargs(args, out, "mc", args.mc_steps, args.mc_lr), value_loss=args.mc_loss,
                         max_length=64, bc_scale=0.0 if args.mc_frozen else 1.0)
    ValueTrainer(model, config, outcome_only(data) if args.mc_loss == "bce" else data, tokenizer).train()
    model.save_pretrained(out / "mc", tokenizer=tokenizer)
    step, best = sweep(model, tokenizer, task, search_configs(task, [args.num_continuations], [args.num_candidates]),
                       args.eval_samples, args.seed)
    return {"mc_step_search": step["reward"], "step_search_tokens": step["generated_tokens"],
            "mc_best_of_n": best["reward"], "best_of_n_tokens": best["generated_tokens"]}


def run_dqo(args, task, tokenizer, data, bc, out: Path) -> float:
    set_seed(args.seed)
    model = TokenQModel(copy.deepcopy(bc), TokenQConfig())
    config = DQOConfig(**_train_kwargs(args, out, "dqo", args.dqo_steps, args.lr), beta=args.dqo_beta, max_length=64)
    DQOTrainer(model, config, data, tokenizer, ref_model=copy.deepcopy(bc)).train()
    model.save_pretrained(out / "dqo", tokenizer=tokenizer)
    return mean_reward(model, tokenizer, task, args, strategy="sample", beta=0.0)


def run_dpo(args, task, tokenizer, bc, out: Path):
    set_seed(args.seed)
    policy = copy.deepcopy(bc).train()
    config = DPOConfig(**_train_kwargs(args, out, "dpo_run", args.dpo_steps, args.lr), beta=args.dpo_beta, bf16=False,
                       gradient_checkpointing=False, max_length=64)
    DPOTrainer(model=policy, ref_model=copy.deepcopy(bc), args=config, train_dataset=task.preference_pairs(),
               processing_class=tokenizer).train()
    restore_forward(policy).save_pretrained(out / "dpo")
    policy.eval()
    sampled = mean_reward(TokenQModel(policy, TokenQConfig()), tokenizer, task, args, strategy="sample", beta=0.0)
    return policy, sampled


def implicit_beam_accuracy(args, task, tokenizer, policy, bc) -> float:
    """Beam search (4 beams) on the DPO policy's implicit Q, decoding from the BC reference."""
    prompts = task.eval_prompts()
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    seqs = implicit_q_generate(policy, bc, enc.input_ids, enc.attention_mask, beta=args.dpo_beta, num_beams=4,
                               do_sample=False, max_new_tokens=task.max_new_tokens, top_k=8,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(seqs[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return float(np.mean(task.score(prompts, completions)["reward"]))


def run_comparison(args: CompareArguments) -> dict:
    start, out = time.time(), Path(args.output_dir)
    task = get_task(args.task)
    tokenizer, data = task.tokenizer(), task.dataset()
    bc = train_behaviour_policy(args, task, tokenizer, data, out)
    results: dict = {"behavior_data": float(np.mean(data["reward"]))}
    results["bc"] = mean_reward(TokenQModel(bc, TokenQConfig()), tokenizer, task, args, strategy="sample", beta=0.0)
    by_beta = run_ilql(args, task, tokenizer, data, bc, out)
    results["ilql_guided"] = max(by_beta.values())
    results.update(run_monte_carlo(args, task, tokenizer, data, bc, out))
    results["dqo"] = run_dqo(args, task, tokenizer, data, bc, out)
    policy, results["dpo"] = run_dpo(args, task, tokenizer, bc, out)
    results["dpo_implicit_beam"] = implicit_beam_accuracy(args, task, tokenizer, policy, bc)
    results["ilql_by_beta"] = {str(k): v for k, v in by_beta.items()}
    results["wall_time_s"] = time.time() - start
    return results
