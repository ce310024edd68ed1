"""Monte-Carlo value regression / Q-probes (CD-FUDGE, Q-probe, PRM-style), then value-guided search.

    accelerate launch recipes/value_lm.py                                  # arithmetic, tiny Llama
    accelerate launch recipes/value_lm.py --config configs/value_probe_qwen.yaml   # frozen real model (GPU)

Without `--config`, `configs/value_arithmetic.yaml`. On a task, evaluates step search (K per step) and
best-of-N by the learned value on held-out prompts and writes `metrics.json`.
"""

import time

from tokenq import ValueConfig, ValueTrainer
from tokenq.evaluation import accuracy, search_accuracy
from tokenq.runner import evaluation_model, finish, parse, prepare, report, train


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    run = prepare(parse(ValueConfig, "value", "arithmetic", argv))
    trainer = ValueTrainer(run.model, run.train_args, run.dataset, run.tokenizer)
    train(trainer, run)
    if run.task is None or not trainer.is_world_process_zero():
        finish(trainer, run)
        return {}
    args, task, seed = run.data_args, run.task, run.train_args.seed
    common = dict(beta=0.0, top_k=args.eval_top_k, top_p=args.eval_top_p, temperature=args.eval_temperature)
    metrics = {"task": task.name}
    model = evaluation_model(trainer, run)
    metrics["sample"], _ = accuracy(model, run.tokenizer, task, args.eval_samples_per_prompt, seed, strategy="sample", **common)
    metrics.update(search_accuracy(model, run.tokenizer, task, args.eval_samples_per_prompt, seed,
                                   search_k=args.eval_search_k, best_of_n=args.eval_best_of_n, **common))
    return report(trainer, run, metrics, start)


if __name__ == "__main__":
    main()
