"""DQO (Direct Q-function Optimization, Ji, Liu et al. 2024): the LM is the Q-function; then sample from it.

    accelerate launch recipes/dqo_lm.py                                      # arithmetic, full fine-tuning
    accelerate launch recipes/dqo_lm.py --config configs/dqo_qwen_lora.yaml  # LoRA: the reference is the base (GPU)

Without `--config`: `configs/dqo_dataset.yaml` for your data (`--dataset_name`), `configs/dqo_TASK.yaml` for
`--task TASK`, else `configs/dqo_arithmetic_full.yaml` (clones the behaviour policy first: `--bc_steps`).
Reports the task's reward of plain sampling from the policy before (`reference_reward`) and after DQO, and
the value diagnostics of its V on the held-out rows.
"""

import copy
import time

from tokenq import DQOConfig, DQOTrainer, TokenQConfig, TokenQModel
from tokenq.evaluation import can_score, sweep
from tokenq.runner import evaluate_run, evaluation_model, finish, parse, prepare, report, train

PLAIN = [{"strategy": "sample", "beta": 0.0}]


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    run = prepare(parse(DQOConfig, "dqo", "arithmetic_full", argv))
    args = run.data_args
    reference = None
    if can_score(run.task):
        reference = TokenQModel(copy.deepcopy(run.model.backbone), TokenQConfig())
        reference = sweep(reference, run.tokenizer, run.task, PLAIN, args.eval_samples_per_prompt, run.train_args.seed,
                          **args.filter_kwargs())[0]
    trainer = DQOTrainer(run.model, run.train_args, run.dataset, run.tokenizer, eval_dataset=run.eval_rows)
    train_result = train(trainer, run)
    if not trainer.is_world_process_zero():
        finish(trainer, run)
        return {}
    # the verdict judges the trained policy against the model it started from (and the data)
    metrics = evaluate_run(trainer, run, evaluation_model(trainer, run), PLAIN, plain=reference)
    metrics.update(reference_reward=reference and reference["reward"], train_steps=train_result.global_step)
    return report(trainer, run, metrics, start)


if __name__ == "__main__":
    main()
