"""How the default for a user's own data (configs/iql_dataset.yaml) was chosen: candidate settings on five small
tasks of our own, each run as a user runs theirs (`tokenq iql --model_name_or_path --dataset_name --eval_dataset
--reward_fn`, a tiny Llama already fine-tuned on the rows), then the result on a task not used to choose them.

    python scripts/choose_defaults.py --json outputs/choose_defaults.json                  # every candidate, 5 tasks
    python scripts/choose_defaults.py --tasks brackets --candidates default                # the check task
    python scripts/choose_defaults.py --candidates default -- --max_steps 600             # with overrides

Tasks (2,000 behaviour rows, 200 held-out rows each; reward functions below):
- `sums`: prompt `T=` (T in 4..15), completion digits 1-4 whose sum should be T; behaviour draws digits at
  random until the sum reaches T (stopping early with probability 0.15); reward 1 for an exact sum.
- `reverse`: prompt `abcd>` (3-6 letters of a-f), completion the letters reversed; behaviour writes each letter
  right with probability 0.7 (else a random letter); reward = share of positions right.
- `count`: prompt `c3:`, completion 6 letters of a-d with the prompt's letter exactly 3 times; behaviour draws the
  letter with probability 0.3 (else any); reward = max(0, 1 - |count - k| / 3).
- `sort` (an ordering): prompt `ecab>` (3-5 distinct letters of a-f), completion the letters in alphabetical order;
  behaviour writes each letter right with probability 0.6 (else a random letter); reward = share of positions right.
- `compare` (a comparison): prompt `37,52>` (two numbers 10-99), completion the larger one; behaviour writes either
  number (each half the time), each digit kept with probability 0.9; reward 1 for the larger number.
- `brackets` (the check task, examples/brackets.py): close a prefix of round and square brackets.
`count`, `sort` and `compare` reward a relation between tokens (how many, which order, which is larger), not copying.
Candidates are overrides on top of configs/iql_dataset.yaml; one row per (task, candidate) with the reward at
every beta (at least 800 decodes per beta), the behaviour data's and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from tokenq.reporting import write_json  # noqa: E402
from tokenq.scripts.iql import main as iql  # noqa: E402


def sums_score(prompts, completions):
    return [float(c.isdigit() and sum(map(int, c)) == int(p[:-1])) for p, c in zip(prompts, completions)]


def sums_rows(n, seed):
    rng, out = np.random.RandomState(seed), []
    for _ in range(n):
        target, text = rng.randint(4, 16), ""
        while sum(map(int, text or "0")) < target and not (text and rng.rand() < 0.15):
            text += str(rng.randint(1, 5))
        out.append({"prompt": f"{target}=", "completion": text})
    return out


def share_right(target, completion):
    return sum(a == b for a, b in zip(target, completion)) / max(len(target), len(completion))


def reverse_score(prompts, completions):
    return [share_right(p[:-1][::-1], c) for p, c in zip(prompts, completions)]


def reverse_rows(n, seed):
    rng, out = np.random.RandomState(seed), []
    for _ in range(n):
        word = "".join("abcdef"[i] for i in rng.randint(6, size=rng.randint(3, 7)))
        text = "".join(ch if rng.rand() < 0.7 else "abcdef"[rng.randint(6)] for ch in word[::-1])
        out.append({"prompt": word + ">", "completion": text})
    return out


def count_score(prompts, completions):
    return [max(0.0, 1 - abs(c.count(p[0]) - int(p[1])) / 3) for p, c in zip(prompts, completions)]


def count_rows(n, seed):
    rng, out = np.random.RandomState(seed), []
    for _ in range(n):
        letter, k = "abcd"[rng.randint(4)], rng.randint(5)
        text = "".join(letter if rng.rand() < 0.3 else "abcd"[rng.randint(4)] for _ in range(6))
        out.append({"prompt": f"{letter}{k}:", "completion": text})
    return out


def sort_score(prompts, completions):
    return [share_right("".join(sorted(p[:-1])), c) for p, c in zip(prompts, completions)]


def sort_rows(n, seed):
    rng, out = np.random.RandomState(seed), []
    for _ in range(n):
        word = "".join(rng.permutation(list("abcdef"))[: rng.randint(3, 6)])
        text = "".join(ch if rng.rand() < 0.6 else "abcdef"[rng.randint(6)] for ch in sorted(word))
        out.append({"prompt": word + ">", "completion": text})
    return out


def compare_score(prompts, completions):
    return [float(c == str(max(map(int, p[:-1].split(","))))) for p, c in zip(prompts, completions)]


def compare_rows(n, seed):
    rng, out = np.random.RandomState(seed), []
    for _ in range(n):
        a, b = rng.randint(10, 100, size=2)
        pick = str(a if rng.rand() < 0.5 else b)
        text = "".join(ch if rng.rand() < 0.9 else str(rng.randint(10)) for ch in pick)
        out.append({"prompt": f"{a},{b}>", "completion": text})
    return out


def brackets_rows(n, seed):
    import brackets

    return brackets.rows(n, seed)


TASKS = {  # name: (rows(n, seed), reward function spec, characters)
    "sums": (sums_rows, "sums_score", "0123456789="),
    "reverse": (reverse_rows, "reverse_score", "abcdef>"),
    "count": (count_rows, "count_score", "abcd01234:"),
    "sort": (sort_rows, "sort_score", "abcdef>"),
    "compare": (compare_rows, "compare_score", "0123456789,>"),
    "brackets": (brackets_rows, None, "()[]"),
}

CANDIDATES = {
    "default": [],
    "randomwalks_recipe": ["--learning_rate", "2e-4", "--head_learning_rate", "2e-4", "--max_steps", "600",
                           "--per_device_train_batch_size", "100", "--gamma", "0.99"],
    "one_lr_1e-3": ["--learning_rate", "1e-3", "--head_learning_rate", "1e-3"],
    "backbone_lr_3e-4": ["--learning_rate", "3e-4"],
    "one_lr_5e-4": ["--learning_rate", "5e-4", "--head_learning_rate", "5e-4"],
    "two_q_heads": ["--num_q_heads", "2"],
    "frozen_backbone": ["--freeze_backbone", "true"],
    "no_zscore_tau0.7_2heads": ["--reward_normalization", "none", "--tau", "0.7", "--num_q_heads", "2"],
    "600_steps": ["--max_steps", "600"],
    "gamma0.99": ["--gamma", "0.99"],
}


def prepare(task: str, folder: Path) -> Path:
    """The task's rows, held-out rows (other prompts where the task has enough) and fine-tuned tiny model."""
    if (folder / "model" / "config.json").is_file():
        return folder
    from toy import write_starting_point

    make, reward, chars = TASKS[task]
    held = make(200, 1)
    train = [r for r in make(4000, 0) if r["prompt"] not in {h["prompt"] for h in held}][:2000]
    if len(train) < 2000:  # few distinct prompts (sums): held-out prompts are also trained on
        train = make(2000, 0)
    if reward is not None:
        score = globals()[reward]
        for r in train + held:
            r["reward"] = score([r["prompt"]], [r["completion"]])[0]
    return write_starting_point(train, held, chars=chars, output_dir=folder)


def run(task: str, candidate: str, out: Path, extra: list[str]) -> dict:
    folder = prepare(task, out / task)
    spec = "examples/brackets.py:score" if task == "brackets" else f"{Path(__file__).resolve()}:{TASKS[task][1]}"
    prompts = {json.loads(line)["prompt"] for line in (folder / "held.jsonl").read_text().splitlines()}
    samples = str(-(-800 // len(prompts)))  # >= 800 decodes per beta: a task with few prompts gets more samples each
    start = time.time()
    metrics = iql(["--model_name_or_path", str(folder / "model"), "--dataset_name", str(folder / "train.jsonl"),
                   "--eval_dataset", str(folder / "held.jsonl"), "--reward_fn", spec, "--disable_tqdm", "true",
                   "--eval_samples_per_prompt", samples,
                   "--output_dir", str(out / task / f"iql_{candidate}"), *CANDIDATES[candidate], *extra])
    rewards = {f"beta{r['beta']:g}": r["reward"] for r in metrics["eval"]}
    said = metrics["verdict"]
    return {"task": task, "candidate": candidate, "behavior": metrics["behavior_reward"], **rewards,
            "q_spearman": said["value"]["spearman"], "q_spearman_p": said["value"]["spearman_p"],
            "value_learned": said["value_learned"], "guidance_helps": said["guidance_helps"],
            "wall_time_s": time.time() - start}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["sums", "reverse", "count", "sort", "compare"], choices=list(TASKS))
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--output_dir", default="outputs/choose_defaults")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    rows = []
    for candidate in args.candidates:
        for task in args.tasks:
            rows.append(run(task, candidate, Path(args.output_dir), extra))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                write_json(args.json, {"rows": rows, "overrides": extra})
    betas = [k for k in rows[0] if k.startswith("beta")]
    print("| task | candidate | behaviour | " + " | ".join(betas) + " | Q Spearman (p) | value learned | guidance helps | wall time (s) |")
    print("|---|---|---:|" + "---:|" * (len(betas) + 4))
    for r in rows:
        print(f"| {r['task']} | {r['candidate']} | {r['behavior']:.3f} | " + " | ".join(f"{r[b]:.3f}" for b in betas)
              + f" | {r['q_spearman'] or 0:.3f} ({r['q_spearman_p']}) | {r['value_learned']} | {r['guidance_helps']} "
              f"| {r['wall_time_s']:.0f} |")


if __name__ == "__main__":
    main()
