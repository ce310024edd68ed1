"""Where each setting of a run comes from, said once at the start: the values a built-in config supplies (the
default config for your data, or a task's), and tokenq's own defaults for every field nobody set; and a warning for
each flag the user gave that the configuration makes ineffective (`--save_steps` under `save_strategy: "no"`)."""

from __future__ import annotations

import logging
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)


def given_flags(argv: list[str]) -> set[str]:
    """The field names the command line sets (`--name value` or `--name=value`)."""
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2}


def _default(f):
    return f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else MISSING


def _short(value) -> str:
    text = repr(value.value if hasattr(value, "value") else value)
    return text if len(text) <= 60 else text[:57] + "..."


def settings_report(argv: list[str], config: str | None, builtin: bool, tokenq_classes: tuple[type, ...],
                    parsed: tuple) -> str:
    """The lines printed at the start of a run: `config`'s values when it is a built-in config (`builtin`) and the
    user did not override them, then the defaults of the fields `tokenq_classes` declare themselves (their
    libraries' fields — TrainingArguments, trl's ModelConfig — keep their documented defaults) that neither
    the config nor the command line set. `parsed`: the parsed dataclass instances (their values)."""
    given = given_flags(argv) - {"config"}
    from_config = yaml.safe_load(Path(config).read_text()) or {} if config else {}
    lines = []
    if builtin and from_config:
        shown = {k: v for k, v in from_config.items() if k not in given}
        lines.append(f"settings from the built-in config {Path(config).name} (override any with --NAME VALUE): "
                     + ", ".join(f"{k}={_short(v)}" for k, v in shown.items()))
    defaults = {}
    for cls in tokenq_classes:
        own = {f.name for f in fields(cls)} - {f.name for base in cls.__mro__[1:] if hasattr(base, "__dataclass_fields__")
                                             for f in fields(base) if not base.__module__.startswith("tokenq")}
        for f in fields(cls):
            if f.name in own and f.name not in given and f.name not in from_config and f.init:
                value = next((getattr(obj, f.name) for obj in parsed if hasattr(obj, f.name)), _default(f))
                defaults[f.name] = value
    if defaults:
        lines.append("tokenq defaults (not set by the config or the command line): "
                     + ", ".join(f"{k}={_short(v)}" for k, v in defaults.items()))
    return "\n".join(lines)


# flag -> (when it has no effect, why): checked against the parsed values
_INEFFECTIVE = {
    "save_steps": (lambda a: _value(a, "save_strategy") == "no", "save_strategy is 'no': add --save_strategy steps"),
    "save_total_limit": (lambda a: _value(a, "save_strategy") == "no", "save_strategy is 'no'"),
    "eval_steps": (lambda a: _value(a, "eval_strategy") == "no", "eval_strategy is 'no': add --eval_strategy steps"),
    "logging_steps": (lambda a: _value(a, "logging_strategy") == "no", "logging_strategy is 'no'"),
    "num_train_epochs": (lambda a: (a.get("max_steps") or 0) > 0, "max_steps > 0 sets the length of the run"),
    "bc_learning_rate": (lambda a: not a.get("bc_steps"), "bc_steps is 0: no behaviour cloning runs"),
    "lora_r": (lambda a: not a.get("use_peft"), "use_peft is false: add --use_peft true"),
    "lora_alpha": (lambda a: not a.get("use_peft"), "use_peft is false"),
    "lora_dropout": (lambda a: not a.get("use_peft"), "use_peft is false"),
    "lora_target_modules": (lambda a: not a.get("use_peft"), "use_peft is false"),
    "task_seed": (lambda a: a.get("dataset_name") is not None, "--dataset_name is given: there is no built-in task"),
    "eval_curve_samples": (lambda a: _value(a, "eval_strategy") == "no", "eval_strategy is 'no': no learning curve"),
}


def _value(values: dict, name: str):
    value = values.get(name)
    return getattr(value, "value", value)


def ineffective_flags(argv: list[str], parsed: tuple) -> list[str]:
    """A warning for each flag the user gave that the parsed configuration makes ineffective."""
    values = {k: v for obj in parsed for k, v in vars(obj).items()}
    return [f"--{flag} has no effect: {why}" for flag, (idle, why) in _INEFFECTIVE.items()
            if flag in given_flags(argv) and idle(values)]


def announce_settings(user_argv: list[str], argv: list[str], parsed: tuple, tokenq_classes: tuple[type, ...],
                      builtin_dir: Path) -> None:
    """Print `settings_report` and warn of `ineffective_flags` (call on the main process, once per run). `user_argv`:
    the command line as given; `argv`: with `--config` resolved (a built-in one is a file in `builtin_dir`)."""
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    builtin = config is not None and Path(config).resolve().parent == builtin_dir.resolve()
    report = settings_report(user_argv, config, builtin, tokenq_classes, parsed)
    if report:
        print(report)
    for warning in ineffective_flags(user_argv, parsed):
        logger.warning(warning)
