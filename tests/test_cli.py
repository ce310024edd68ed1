"""The `tokenq` command, run as a user runs it: in a subprocess, from a folder outside the repository."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_checkpoint import assert_same_outputs
from tokenq import TokenQModel

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--per_device_train_batch_size", "50",
        "--eval_samples_per_prompt", "1", "--eval_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true"]


def tokenq(*argv: str, cwd: Path, launcher=(sys.executable, "-m", "tokenq")) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`tokenq iql --config randomwalks` (a built-in config by name) from a folder outside the repository."""
    cwd = tmp_path_factory.mktemp("anywhere")
    tokenq("iql", "--config", "randomwalks", "--max_steps", "3", "--output_dir", "run", *TINY, cwd=cwd)
    return cwd / "run"


def test_console_script_and_help(tmp_path, capsys):
    script = Path(sys.executable).parent / "tokenq"
    assert script.is_file()  # [project.scripts]
    out = tokenq("--help", cwd=tmp_path, launcher=(str(script),))
    for command in ("tokenq iql", "tokenq value", "tokenq dqo", "tokenq generate", "tokenq eval", "tokenq push", "tokenq sweep"):
        assert command in out
    from tokenq.cli import main

    main(["configs"])  # in this process: the console script itself ran above
    assert "iql_randomwalks" in capsys.readouterr().out


def test_train_writes_a_checkpoint_with_metrics(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and len(metrics["eval"]) == 5 and metrics["task"] == "randomwalks"
    assert TokenQModel.from_pretrained(str(trained)).tokenq_config.q_rank == 32


@pytest.mark.slow
def test_generate_prints_completions_with_scores_and_compute(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("b\nc\n")
    out = tokenq("generate", str(trained), "--prompts_file", str(prompts), "--prompt", "d", "--strategy", "best_of_n",
                 "--num_candidates", "2", "--beta", "0", "--max_new_tokens", "4", "--top_k", "10",
                 "--json", str(tmp_path / "rows.json"), cwd=tmp_path)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["prompt"] for r in rows] == ["d", "b", "c"]  # --prompt first, then the file
    assert all(r["generated_tokens"] > 0 and r["forward_rows"] > 0 for r in rows)
    assert "| value score | tokens | forward rows |" in out and out.count("\n| ") == 3  # 3 rows under the header


@pytest.mark.slow
def test_eval_prints_the_task_metrics(trained, tmp_path):
    out = tokenq("eval", str(trained), "--task", "randomwalks", "--eval_betas", "0", "4", "--eval_samples_per_prompt", "1",
                 "--output_dir", str(tmp_path), cwd=tmp_path)
    saved = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert saved["task"] == "randomwalks" and [r["beta"] for r in saved["eval"]] == [0.0, 4.0]
    assert "| data (behaviour) | | 0.352 |" in out


@pytest.mark.slow
def test_push_uploads_the_folder_through_the_hub_edge(trained, tmp_path):
    """The subprocess replaces only the network edge (tests/fake_hub.py), then runs the command."""
    code = (
        "import sys; from pathlib import Path; import pytest; sys.path.insert(0, sys.argv[1])\n"
        "from tests.fake_hub import FakeHub\nfrom tokenq.cli import main\n"
        "hub = FakeHub(Path(sys.argv[2])).install(pytest.MonkeyPatch())\n"
        "main(sys.argv[3:])\nprint('FILES', sorted(hub.repo_files('someone/cli-run')))\n"
    )
    remote = tmp_path / "hub"
    out = tokenq(str(ROOT), str(remote), "push", str(trained), "someone/cli-run", cwd=tmp_path,
                 launcher=(sys.executable, "-c", code))
    files = eval(out.split("FILES", 1)[1])
    assert {"tokenq_config.json", "tokenq_heads.safetensors", "model.safetensors", "README.md", "metrics.json"} <= set(files)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(trained)
    assert_same_outputs(TokenQModel.from_pretrained(str(trained)),
                        TokenQModel.from_pretrained(str(remote / "repos" / "someone/cli-run")), tokenizer)


@pytest.mark.slow
def test_accelerate_launch_module_on_two_processes(tmp_path):
    out = tokenq("--config_file", str(ROOT / "configs" / "accelerate" / "ddp_cpu_2proc.yaml"), "-m", "tokenq", "iql",
                 "--max_steps", "2", "--output_dir", "run", *TINY, cwd=tmp_path,
                 launcher=(sys.executable, "-m", "accelerate.commands.launch"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and out.count("| data (behaviour) |") == 1  # evaluated once
