"""DQO (Direct Q-function Optimization, Ji, Liu et al. 2024): the LM is the Q-function; then sample from it.

    accelerate launch recipes/dqo_lm.py                                      # arithmetic, full fine-tuning
    accelerate launch recipes/dqo_lm.py --config configs/dqo_qwen_lora.yaml  # LoRA: the reference is the base (GPU)

Without `--config`, `configs/dqo_arithmetic_full.yaml` (clones the behaviour policy first: `--bc_steps`).
On a task, reports held-out accuracy of plain sampling from the policy before and after DQO.
"""

import copy
import time

from tokenq import DQOConfig, DQOTrainer, TokenQConfig, TokenQModel
from tokenq.evaluation import accuracy
from tokenq.runner import evaluation_model, finish, parse, prepare, report, train


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    run = prepare(parse(DQOConfig, "dqo", "arithmetic_full", argv))
    args, task, seed = run.data_args, run.task, run.train_args.seed
    common = dict(strategy="sample", beta=0.0, top_k=args.eval_top_k, top_p=args.eval_top_p, temperature=args.eval_temperature)
    metrics = {"task": getattr(task, "name", None)}
    if task is not None:
        reference = TokenQModel(copy.deepcopy(run.model.backbone), TokenQConfig())
        metrics["reference_sample"], _ = accuracy(reference, run.tokenizer, task, args.eval_samples_per_prompt, seed, **common)
    trainer = DQOTrainer(run.model, run.train_args, run.dataset, run.tokenizer)
    train(trainer, run)
    if task is None or not trainer.is_world_process_zero():
        finish(trainer, run)
        return {}
    metrics["dqo_sample"], _ = accuracy(evaluation_model(trainer, run), run.tokenizer, task, args.eval_samples_per_prompt, seed, **common)
    return report(trainer, run, metrics, start)


if __name__ == "__main__":
    main()
