"""ILQL on a token-level MDP: parse, build, train, evaluate Q-guided decoding, save.

    accelerate launch recipes/iql_lm.py                                    # randomwalks, tiny GPT-2
    accelerate launch recipes/iql_lm.py --config arithmetic                # arithmetic (configs/iql_arithmetic.yaml)
    accelerate launch recipes/iql_lm.py --model_name_or_path MODEL --dataset_name rows.jsonl \
        --eval_dataset held.jsonl --reward_fn reward.py:score              # your task (configs/iql_dataset.yaml)

Without `--config`: `configs/iql_dataset.yaml` for your data (`--dataset_name`), `configs/iql_TASK.yaml` for
`--task TASK`, else `configs/iql_randomwalks.yaml`; any field of `DataArguments`, `IQLConfig`, trl's
`ModelConfig` or `TokenQConfig` can be overridden on the command line. Evaluation goes through the task
protocol: guided sampling at every `--eval_betas` on the held-out prompts (when completions can be scored)
and the value diagnostics on the held-out rows (when there are any).
"""

import time
from pathlib import Path

from tokenq import GuidedEval, IQLConfig, IQLTrainer
from tokenq.evaluation import beta_configs, can_score
from tokenq.reporting import learning_curve, plot_reward_vs_beta
from tokenq.runner import evaluate_run, evaluation_model, finish, parse, prepare, report, train


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    run = prepare(parse(IQLConfig, "iql", "randomwalks", argv))
    args, train_args, tokenizer, task = run.data_args, run.train_args, run.tokenizer, run.task
    guided_eval = None
    if can_score(task):  # the learning curve, by `--eval_strategy steps --eval_steps N`
        guided_eval = GuidedEval(tokenizer, task, max(args.eval_betas), args.eval_curve_samples, **args.filter_kwargs())
    trainer = IQLTrainer(run.model, train_args, run.dataset, tokenizer, eval_dataset=run.eval_rows, guided_eval=guided_eval)
    if guided_eval is not None and trainer.sharded:  # decoding on the main process alone would wait on the shards
        print("FSDP / ZeRO-3: no guided evaluation during training (it runs on the saved checkpoint at the end)")
        trainer.guided_eval = None

    train_result = train(trainer, run)
    if not trainer.is_world_process_zero():
        finish(trainer, run)
        return {}
    configs = beta_configs(args.eval_betas)
    metrics = evaluate_run(trainer, run, evaluation_model(trainer, run), configs)
    metrics.update(curve=learning_curve(trainer.state.log_history), train_steps=train_result.global_step,
                   train_runtime_s=train_result.metrics["train_runtime"],
                   train_steps_per_second=train_result.metrics["train_steps_per_second"])
    plots = ()
    if metrics.get("eval"):
        plot_reward_vs_beta(metrics["eval"], metrics["behavior_reward"], Path(train_args.output_dir) / "reward_vs_beta.png",
                            title=f"ILQL on {metrics['task']}", curve=metrics["curve"])
        plots = ("reward_vs_beta.png",)
    return report(trainer, run, metrics, start, plots)


if __name__ == "__main__":
    main()
