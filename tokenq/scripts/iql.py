"""ILQL on a token-level MDP: parse, build, train, evaluate Q-guided decoding, save.

    accelerate launch recipes/iql_lm.py                                    # randomwalks, tiny GPT-2
    accelerate launch recipes/iql_lm.py --config configs/iql_randomwalks.yaml --max_steps 300
    accelerate launch recipes/iql_lm.py --config configs/iql_qwen_lora.yaml  # a real model (GPU, network)

Without `--config`, `configs/iql_randomwalks.yaml` is the configuration; any field of `DataArguments`,
`IQLConfig`, trl's `ModelConfig` or `TokenQConfig` can be overridden on the command line.
"""

import time
from pathlib import Path

from tokenq import GuidedEval, IQLConfig, IQLTrainer
from tokenq.evaluation import behaviour_metrics, evaluate_betas
from tokenq.reporting import learning_curve, plot_optimality_vs_beta, results_table, write_json
from tokenq.runner import evaluation_model, finish, parse, prepare, sharded, train


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    run = prepare(parse(IQLConfig, "iql", "randomwalks", argv))
    data_args, train_args, model, tokenizer, task = run.data_args, run.train_args, run.model, run.tokenizer, run.task
    sample_kwargs = {"top_k": data_args.eval_top_k, "top_p": data_args.eval_top_p, "temperature": data_args.eval_temperature}
    guided_eval = None
    if task is not None:  # the learning curve, by `--eval_strategy steps --eval_steps N`
        guided_eval = GuidedEval(tokenizer, task, max(data_args.eval_betas), data_args.eval_curve_samples, **sample_kwargs)
    trainer = IQLTrainer(model, train_args, run.dataset, tokenizer, guided_eval=guided_eval)
    if guided_eval is not None and sharded(trainer):  # decoding on the main process alone would wait on the shards
        print("FSDP / ZeRO-3: no guided evaluation during training (it runs on the saved checkpoint at the end)")
        trainer.guided_eval = None

    train_result = train(trainer, run)
    if task is None or not trainer.is_world_process_zero():
        finish(trainer, run)
        return {}

    model = evaluation_model(trainer, run)
    rows = evaluate_betas(model, tokenizer, task, data_args.eval_betas, data_args.eval_samples_per_prompt, seed=train_args.seed, **sample_kwargs)
    behaviour = behaviour_metrics(task)
    best = max(rows, key=lambda r: r["optimality"])
    metrics = {
        "task": task.name,
        **behaviour,
        "eval": rows,
        "best_beta": best["beta"],
        "best_optimality": best["optimality"],
        "eval_filter": sample_kwargs,
        "eval_samples_per_prompt": data_args.eval_samples_per_prompt,
        "curve": learning_curve(trainer.state.log_history),
        "train_steps": train_result.global_step,
        "train_runtime_s": train_result.metrics["train_runtime"],
        "train_steps_per_second": train_result.metrics["train_steps_per_second"],
        "wall_time_s": time.time() - start,
    }
    out = Path(train_args.output_dir)
    write_json(out / "metrics.json", metrics)
    trainer.log({**{f"eval_optimality_beta{r['beta']:g}": r["optimality"] for r in rows},  # to report_to too
                 "eval_best_optimality": best["optimality"]})
    plot_optimality_vs_beta(rows, behaviour["behavior_optimality"], out / "optimality_vs_beta.png",
                            title=f"ILQL on {task.name}", curve=metrics["curve"])
    table = results_table(rows, behaviour["behavior_optimality"])
    summary = {k: metrics[k] for k in ("best_beta", "best_optimality", "train_steps", "wall_time_s")}
    finish(trainer, run, {"table": table, "metrics": summary, "plots": ["optimality_vs_beta.png"]})
    print(table)
    print(f"wrote {out}/metrics.json and optimality_vs_beta.png; wall time {metrics['wall_time_s']:.0f}s")
    return metrics


if __name__ == "__main__":
    main()
