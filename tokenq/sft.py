"""Behaviour cloning of the data's policy with trl's `SFTTrainer` (the pi_beta / pi_ref that value
search, DQO and DPO start from). Rows of any tokenq format become prompt-completion (or chat) rows."""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from tokenq.mdp import STEP_SEPARATOR, detect_format


def as_sft_rows(dataset: Dataset) -> Dataset:
    """prompt/completion rows for outcome and process data (steps joined); chat rows keep `messages`."""
    fmt = detect_format(dataset.column_names)
    if fmt == "chat":
        return dataset.select_columns(["messages"])
    if fmt in ("process", "stepwise"):
        steps, join = ("steps", "") if fmt == "process" else ("completions", STEP_SEPARATOR)
        return dataset.map(lambda r: {"prompt": r["prompt"], "completion": join.join(r[steps]) + join},
                           remove_columns=dataset.column_names)
    return dataset.select_columns(["prompt", "completion"])  # outcome / preference, strings or messages


def behaviour_cloning(backbone, tokenizer, dataset: Dataset, output_dir: str, *, max_steps: int, batch_size: int = 64,
                      learning_rate: float = 1e-3, seed: int = 0, **sft_kwargs):
    """Train `backbone` in place on the completions of `dataset` (completion-only loss) and return it.
    A frozen backbone (`--freeze_backbone`: clone pi_beta, then fit heads on it) is unfrozen for cloning
    and frozen again afterwards."""
    args = SFTConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=min(100, max_steps // 10), seed=seed, report_to="none",
        save_strategy="no", bf16=False, gradient_checkpointing=False, dataloader_pin_memory=False, **sft_kwargs,
    )  # trl's configs default to bf16 and gradient checkpointing even on CPU: say what we mean
    frozen = [p for p in backbone.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        SFTTrainer(model=backbone, args=args, train_dataset=as_sft_rows(dataset), processing_class=tokenizer).train()
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return restore_forward(backbone)


def restore_forward(model):
    """Undo trl's patch of `model.forward` (a fused-LM-head forward that closes over the original bound
    method): left in place, a `copy.deepcopy` of the model would still run the original's weights."""
    model.__dict__.pop("forward", None)
    return model
