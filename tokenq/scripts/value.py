"""Monte-Carlo value regression / Q-probes (CD-FUDGE, Q-probe, PRM-style), then value-guided search.

    accelerate launch recipes/value_lm.py                                  # arithmetic, tiny Llama
    accelerate launch recipes/value_lm.py --config configs/value_probe_qwen.yaml   # frozen real model (GPU)
    accelerate launch recipes/value_lm.py --model_name_or_path MODEL --dataset_name rows.jsonl --reward_fn r.py:fn

Without `--config`: `configs/value_dataset.yaml` for your data, `configs/value_TASK.yaml` for `--task TASK`, else
`configs/value_arithmetic.yaml`. Evaluates plain sampling, step search (each `--eval_num_continuations` K per
step) and best-of-N (each `--eval_num_candidates` N) ranked by the learned value on the held-out prompts, and
the value diagnostics on the held-out rows; writes `metrics.json`.

With `--policy MODEL` (or `behaviour_clone`) it trains a critic for that frozen policy on the policy's own rollouts
instead, and evaluates the policy steered by it (`tokenq.critic`; `--config arithmetic_critic`).
"""

import time

from tokenq import ValueConfig, ValueTrainer
from tokenq.critic import CriticArguments, critic_for_policy
from tokenq.evaluation import search_configs
from tokenq.runner import evaluate_run, evaluation_model, finish, parse, prepare, report, train


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    run = parse(ValueConfig, "value", "arithmetic", argv, extra=(CriticArguments,))
    if run.extra[0].policy:  # a critic for a frozen policy, on its own rollouts
        return critic_for_policy(run, run.extra[0], start)
    run = prepare(run)
    trainer = ValueTrainer(run.model, run.train_args, run.dataset, run.tokenizer, eval_dataset=run.eval_rows)
    train_result = train(trainer, run)
    if not trainer.is_world_process_zero():
        finish(trainer, run)
        return {}
    args = run.data_args
    configs = [{"strategy": "sample", "beta": 0.0}] + search_configs(
        run.task, args.eval_num_continuations, args.eval_num_candidates, args.eval_step_tokens, args.eval_step_stop_strings)
    metrics = evaluate_run(trainer, run, evaluation_model(trainer, run), configs)
    metrics["train_steps"] = train_result.global_step
    return report(trainer, run, metrics, start)


if __name__ == "__main__":
    main()
