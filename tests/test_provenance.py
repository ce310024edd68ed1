"""Every value the user did not give is printed once at the start with its source; a flag the configuration makes
ineffective gets a warning."""

import shutil

from tokenq import IQLConfig
from tokenq.runner import builtin_config, parse


def test_a_builtin_configs_values_are_printed_with_their_source(capsys, caplog):
    with caplog.at_level("WARNING"):
        parse(IQLConfig, "iql", "randomwalks", ["--dataset_name", "rows.jsonl", "--learning_rate", "1e-3"])
    out = capsys.readouterr().out
    config_line = next(line for line in out.splitlines() if line.startswith("settings from the built-in config"))
    assert "iql_dataset.yaml" in config_line and "max_steps=1200" in config_line and "tau=0.9" in config_line
    assert "learning_rate=0.0001" not in config_line  # given on the command line: the user's own
    defaults = next(line for line in out.splitlines() if line.startswith("tokenq defaults"))
    assert "max_nonfinite_steps=0" in defaults and " tau=" not in defaults and " learning_rate=" not in defaults
    assert not caplog.records


def test_a_users_own_config_file_is_theirs(tmp_path, capsys):
    mine = shutil.copy(builtin_config("iql_dataset.yaml"), tmp_path / "mine.yaml")
    parse(IQLConfig, "iql", "randomwalks", ["--config", str(mine), "--dataset_name", "rows.jsonl"])
    out = capsys.readouterr().out
    assert "settings from the built-in config" not in out and "tokenq defaults" in out


def test_flags_the_configuration_makes_ineffective_are_named(caplog):
    with caplog.at_level("WARNING"):
        run = parse(IQLConfig, "iql", "randomwalks", ["--task", "randomwalks", "--save_steps", "2", "--lora_r", "4",
                                                      "--bc_learning_rate", "0.1", "--num_train_epochs", "2"])
    assert run.train_args.save_strategy == "no"  # iql_randomwalks.yaml
    text = caplog.text
    assert "--save_steps has no effect: save_strategy is 'no': add --save_strategy steps" in text
    assert "--lora_r has no effect: use_peft is false" in text
    assert "--bc_learning_rate has no effect: bc_steps is 0" in text
    assert "--num_train_epochs has no effect: max_steps > 0" in text
    caplog.clear()
    with caplog.at_level("WARNING"):
        parse(IQLConfig, "iql", "randomwalks", ["--task", "randomwalks", "--save_strategy", "steps", "--save_steps", "2"])
    assert "has no effect" not in caplog.text
