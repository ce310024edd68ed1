"""End-to-end runs of recipes/iql_lm.py: a tiny fast run, a local model + dataset, and (slow) the default."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from tokenq.modeling import TokenQModel

ROOT = Path(__file__).resolve().parent.parent


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--per_device_train_batch_size", "50",
        "--eval_samples_per_prompt", "2", "--eval_steps", "2", "--eval_curve_samples", "2", "--logging_steps", "2",
        "--use_cpu", "true", "--disable_tqdm", "true"]


def test_default_recipe_short_run(tmp_path):
    out = tmp_path / "run"
    metrics = _recipe("iql_lm").main(["--max_steps", "4", "--output_dir", str(out), *TINY])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["behavior_reward"] == pytest.approx(0.3515, abs=1e-3) and saved["task"] == "randomwalks"
    assert [row["beta"] for row in saved["eval"]] == [0, 1, 4, 16, 100]
    assert all(set(row) >= {"beta", "reward", "optimality", "length", "reached"} for row in saved["eval"])
    assert all(row["reward"] == row["optimality"] for row in saved["eval"])  # randomwalks' reward is its optimality
    assert len(saved["curve"]) == 2 and metrics["train_steps"] == 4
    assert {"reward", "optimality", "beta"} <= set(saved["curve"][0])
    diagnostics = saved["value_diagnostics"]  # on randomwalks' held-out walks
    assert diagnostics["rows"] == 200 and {"mse", "pearson", "spearman", "spearman_p", "roc_auc", "roc_auc_p"} == set(diagnostics["v0"])
    assert (out / "reward_vs_beta.png").stat().st_size > 0
    model = TokenQModel.from_pretrained(str(out))
    assert model.tokenq_config.q_head == "low_rank"
    card = ModelCard.load(out / "README.md")  # the model card carries the results
    assert card.data.library_name == "tokenq" and {"ilql", "tokenq"} <= set(card.data.tags)
    assert card.data.datasets == ["randomwalks"] and "| beta=100 |" in card.text and "![reward_vs_beta.png]" in card.text


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_recipe_with_gradient_checkpointing(tmp_path, lora):
    extra = ["--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "c_attn"] if lora else []
    metrics = _recipe("iql_lm").main(["--max_steps", "4", "--output_dir", str(tmp_path), "--gradient_checkpointing", "true",
                                      *TINY, "--eval_strategy", "no", *extra])
    assert metrics["train_steps"] == 4
    assert TokenQModel.from_pretrained(str(tmp_path)).backbone_trainable == (not lora)


def test_resume_from_checkpoint_true_takes_the_latest(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--save_strategy", "steps", "--save_steps", "2", *TINY, "--eval_strategy", "no"]
    _recipe("iql_lm").main(["--max_steps", "4", *argv])
    state_file = tmp_path / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].append({"step": 4, "resumed_from_here": 1.0})
    state_file.write_text(json.dumps(state))
    metrics = _recipe("iql_lm").main(["--max_steps", "6", "--resume_from_checkpoint", "true", *argv])
    assert metrics["train_steps"] == 6
    history = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert {"step": 4, "resumed_from_here": 1.0} in history


def test_recipe_on_a_local_model_and_dataset_with_lora(tmp_path, llama_dir):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "q" + str(i % 5), "completion": " a" + str(i % 3), "reward": float(i % 3 == 0)} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    _recipe("iql_lm").main([
        "--model_name_or_path", llama_dir, "--dataset_name", str(data), "--use_peft", "true", "--lora_r", "4",
        "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--max_length", "64", "--output_dir", str(out), "--use_cpu", "true", "--disable_tqdm", "true",
    ])
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenq_heads.safetensors").is_file()
    assert TokenQModel.from_pretrained(str(out)).tokenq_config.head_layer == -1


def test_recipe_rejects_a_malformed_dataset_before_training(tmp_path, llama_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b", "reward": 1.0}) + "\n"
                    + json.dumps({"prompt": "a", "completion": "b", "reward": None}) + "\n")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"row 1: field 'reward'"):
        _recipe("iql_lm").main(["--model_name_or_path", llama_dir, "--dataset_name", str(data), "--output_dir", str(out), "--use_cpu", "true"])
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_default_run_reaches_the_target(tmp_path):
    """The README's main job, as shipped: guided optimality >= 0.97 and >= behaviour + 0.30."""
    out = tmp_path / "default"
    metrics = _recipe("iql_lm").main(["--output_dir", str(out)])
    best = max(row["optimality"] for row in metrics["eval"])
    assert best >= 0.97 and best >= metrics["behavior_reward"] + 0.30
    said = metrics["verdict"]  # a run that works says so
    assert said["value_learned"] and said["guidance_helps"] and said["message"].startswith("The value function learned")


@pytest.mark.slow
def test_default_recipe_holds_on_the_hardest_other_graph(tmp_path):
    """The default is not tuned to graph 1000: on graph 23, the hardest of seeds 20-29 for it (13% of the walks
    arrive), guided optimality at beta 100 (README, "The default on other graphs": 0.960 in the reported sweep,
    0.96-1.0 over training seeds) stays >= 0.95, i.e. at most one of its 17 start nodes takes a detour; the
    previous default reached 0.77 there (four start nodes on the long way), z-scored returns alone 0.90."""
    metrics = _recipe("iql_lm").main(["--task_seed", "23", "--output_dir", str(tmp_path / "graph_23"),
                                      "--eval_strategy", "no", "--eval_betas", "100"])
    assert metrics["eval"][0]["optimality"] >= 0.95


TRAINING_CONFIGS = sorted(p for prefix in ("iql", "value", "dqo") for p in (ROOT / "configs").glob(f"{prefix}_*.yaml"))


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_training_config_parses(config):
    """Every recipe config names only real fields (TrlParser raises on unknown keys)."""
    from trl import ModelConfig, TrlParser

    from tokenq import DataArguments, DQOConfig, IQLConfig, TokenQConfig, ValueConfig

    recipe = {"iql": "iql_lm", "value": "value_lm", "dqo": "dqo_lm"}[config.name.split("_")[0]]
    config_cls = {"iql_lm": IQLConfig, "value_lm": ValueConfig, "dqo_lm": DQOConfig}[recipe]
    assert config.read_text().startswith(f"# accelerate launch recipes/{recipe}.py")
    from tokenq.critic import CriticArguments

    extra = (CriticArguments,) if recipe == "value_lm" else ()  # tokenq value: a critic for a given policy too
    parser = TrlParser((DataArguments, config_cls, ModelConfig, TokenQConfig, *extra))
    cpu_override = [] if torch.cuda.is_available() else ["--bf16", "false"]  # GPU configs ask for bf16
    data_args, train_args, model_args, head_config = parser.parse_args_and_config(["--config", str(config), *cpu_override])[:4]
    assert train_args.output_dir.startswith("outputs/")


def test_sweep_recipe_sweeps_strategies_on_a_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    _recipe("iql_lm").main(["--max_steps", "2", "--output_dir", str(ckpt), *TINY])
    out = tmp_path / "sweep"
    rows = _recipe("sweep").main([
        str(ckpt), "--task", "randomwalks", "--output_dir", str(out), "--eval_samples_per_prompt", "2",
        "--eval_betas", "0", "4", "--eval_num_beams", "2", "--eval_num_candidates", "2", "--eval_num_continuations", "2",
    ])
    assert [r["strategy"] for r in rows] == ["sample", "sample", "greedy", "greedy", "beam", "beam", "best_of_n", "resample",
                                             "step_search", "dvts", "astar", "mcts"]
    saved = json.loads((out / "sweep_metrics.json").read_text())
    assert saved["eval"] == rows and saved["behavior_reward"] == pytest.approx(0.3515, abs=1e-3)
    assert all(0 <= r["reward"] <= 1 and r["generated_tokens"] > 0 and r["forward_passes"] > 0 for r in rows)
    assert rows[0]["kl"] == 0.0 and rows[2]["kl"] is None and rows[6]["kl"] > 0  # beta 0; greedy; selection
    assert all(r["step_tokens"] == 1 for r in rows[8:])  # the task's config: a step is one node
    assert (out / "reward_vs_kl.png").stat().st_size > 0 and (out / "reward_vs_compute.png").stat().st_size > 0


def test_sweep_config_parses():
    from trl import TrlParser

    from tokenq import EvalArguments
    from tokenq.scripts.evaluate import CheckpointArguments

    config = ROOT / "configs" / "sweep_randomwalks.yaml"
    assert config.read_text().startswith("# tokenq sweep")
    _, args = TrlParser((CheckpointArguments, EvalArguments)).parse_args_and_config(["--config", str(config)])
    assert args.eval_step_tokens == 1 and args.eval_num_candidates == [2, 4, 8, 16] and args.task == "randomwalks"


ARITH_TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--bc_steps", "3", "--max_steps", "3",
              "--per_device_train_batch_size", "16", "--eval_samples_per_prompt", "1", "--use_cpu", "true",
              "--disable_tqdm", "true", "--logging_steps", "1"]


def test_value_recipe_short_run(tmp_path):
    metrics = _recipe("value_lm").main(["--output_dir", str(tmp_path), *ARITH_TINY])
    assert [r["strategy"] for r in metrics["eval"]] == ["sample", "step_search", "best_of_n"]
    assert metrics["eval"][1]["step_stop_strings"] == [";"]  # the task's step boundary
    assert metrics["value_diagnostics"]["v0"]["roc_auc"] is not None  # BCE on the 0/1 outcome
    model = TokenQModel.from_pretrained(str(tmp_path))
    assert model.tokenq_config.value_link == "sigmoid" and not model.backbone_trainable


def test_dqo_recipe_short_run(tmp_path):
    metrics = _recipe("dqo_lm").main(["--output_dir", str(tmp_path), *ARITH_TINY])
    assert 0 <= metrics["reference_reward"] <= 1 and 0 <= metrics["eval"][0]["reward"] <= 1
    assert "q" not in metrics["value_diagnostics"]  # DQO trains no Q heads
    assert (tmp_path / "model.safetensors").is_file()


def test_bc_steps_refuse_lora(tmp_path):
    with pytest.raises(ValueError, match="bc_steps"):
        _recipe("dqo_lm").main(["--output_dir", str(tmp_path), "--use_peft", "true", *ARITH_TINY])


def test_compare_recipe_tiny_run(tmp_path):
    keys = ["behavior_data", "bc", "ilql_guided", "mc_step_search", "mc_best_of_n", "dqo", "dpo", "dpo_implicit_beam"]
    tiny = {"n_layer": 1, "n_embd": 32, "n_head": 2, "batch_size": 16, "bc_steps": 2, "ilql_steps": 2, "mc_steps": 2,
            "dqo_steps": 2, "dpo_steps": 2, "eval_samples": 1}
    argv = ["--output_dir", str(tmp_path), *[x for k, v in tiny.items() for x in (f"--{k}", str(v))]]
    metrics = _recipe("compare").main(argv)
    saved = json.loads((tmp_path / "compare_metrics.json").read_text())
    assert all(0 <= saved[k] <= 1 for k in keys) and saved["behavior_data"] == pytest.approx(metrics["behavior_data"])
    assert saved["step_search_tokens"] > 0 and saved["best_of_n_tokens"] > 0
    assert set(saved["targets"]) == {"mc_step_search >= behavior_data + 0.40", "dqo >= behavior_data + 0.20",
                                     "dqo >= dpo", "mc_step_search >= mc_best_of_n at no more tokens"}
    table = (tmp_path / "compare_table.md").read_text()
    assert all(f"`{k}`" in table for k in keys)


@pytest.mark.slow
def test_default_comparison_learns(tmp_path):
    """The shipped comparison (about 5 min): every method improves on the behaviour clone by a wide margin,
    and value-guided step search beats best-of-N. The issue's exact targets are reported by the recipe,
    not asserted (two of them are not met; see README)."""
    m = _recipe("compare").main(["--output_dir", str(tmp_path)])
    assert m["behavior_data"] == pytest.approx(0.4285) and 0.3 <= m["bc"] <= 0.5
    for key in ("ilql_guided", "mc_step_search", "dpo", "dpo_implicit_beam"):
        assert m[key] >= m["bc"] + 0.3, key
    assert m["dqo"] >= m["bc"] + 0.15 and m["mc_step_search"] >= m["mc_best_of_n"] + 0.03


def test_report_to_tensorboard_carries_the_eval_curve(tmp_path):
    pytest.importorskip("tensorboard")  # pip install -e ".[tracking]"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _recipe("iql_lm").main(["--max_steps", "4", "--output_dir", str(out), *TINY, "--report_to", "tensorboard"])
    events = sorted(out.rglob("events.out.tfevents.*"))
    assert events
    scalars = {}  # the logs after training go to a second event file (the callback's writer closes at train end)
    for file in events:
        acc = EventAccumulator(str(file)).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    assert [step for step, _ in scalars["eval/reward"]] == [2, 4]  # the learning curve, every eval_steps
    assert [step for step, _ in scalars["eval/optimality"]] == [2, 4]  # the task's extras beside it
    assert {"train/loss/q", "train/loss/cql", "eval/best_reward", "eval/reward/sample_beta100"} <= set(scalars)
    assert [step for step, _ in scalars["eval/value/v0_pearson"]] == [2, 4, 4]  # each evaluation, and the final one
    saved = json.loads((out / "metrics.json").read_text())
    assert [c["reward"] for c in saved["curve"]] == pytest.approx([v for _, v in scalars["eval/reward"]])


@pytest.mark.parametrize("prefix, argv, config", [
    ("iql", ["--dataset_name", "rows.jsonl"], "iql_dataset.yaml"),  # a user's data: its own default, not a toy's
    ("iql", ["--task", "arithmetic"], "iql_arithmetic.yaml"),
    ("iql", [], "iql_randomwalks.yaml"),
    ("value", ["--dataset_name", "rows.jsonl"], "value_dataset.yaml"),
    ("dqo", ["--dataset_name", "rows.jsonl"], "dqo_dataset.yaml"),
    ("dqo", ["--task", "arithmetic"], "dqo_arithmetic_full.yaml"),  # no dqo_arithmetic.yaml: the recipe's default
    ("sweep", ["--task", "randomwalks"], "sweep_randomwalks.yaml"),
    ("sweep", ["--eval_dataset", "held.jsonl"], None),
])
def test_a_command_without_config_runs_the_config_of_its_data(prefix, argv, config):
    from tokenq.runner import with_config

    default = {"iql": "randomwalks", "value": "arithmetic", "dqo": "arithmetic_full", "sweep": None}[prefix]
    resolved = with_config(argv, prefix, default)
    assert (Path(resolved[1]).name if resolved[:1] == ["--config"] else None) == config
    explicit = str(ROOT / "configs" / "iql_randomwalks.yaml")
    assert with_config(["--config", explicit, *argv], prefix, default)[:2] == ["--config", explicit]  # given: kept
