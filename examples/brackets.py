"""A small task of our own, run end to end as a user runs theirs (README, "Your own task"): close the brackets.

A prompt is an unbalanced prefix of round and square brackets, e.g. `([(`; a completion should close it into a
balanced string, `)])`, and stop. The behaviour data comes from a policy that takes the right step (close the
innermost open bracket with its partner; stop once everything is closed) with probability 0.5, and otherwise
one of the five actions `( ) [ ] <stop>` at random, for at most 12 characters. The reward is 1 for a
balanced string and 0 otherwise.

    python examples/brackets.py --output_dir outputs/brackets       # data + a tiny Llama fine-tuned on it
    tokenq iql --model_name_or_path outputs/brackets/model --dataset_name outputs/brackets/train.jsonl \\
        --eval_dataset outputs/brackets/held.jsonl --reward_fn examples/brackets.py:score --output_dir outputs/brackets/iql

`score` is the reward function tokenq calls (`--reward_fn examples/brackets.py:score`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PAIRS = {")": "(", "]": "["}  # closing -> opening
CLOSE = {"(": ")", "[": "]"}  # opening -> closing
OPEN = "(["
MAX_COMPLETION = 12


def balanced(text: str) -> bool:
    stack = []
    for c in text:
        if c in OPEN:
            stack.append(c)
        elif c in PAIRS:
            if not stack or stack.pop() != PAIRS[c]:
                return False
        else:
            return False
    return not stack


def score(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 where prompt + completion is a balanced bracket string, else 0.0."""
    return [float(balanced(p + c)) for p, c in zip(prompts, completions)]


def _prompt(rng: np.random.RandomState) -> str:
    """An unbalanced prefix that can be closed: up to 10 brackets, at least one left open."""
    text, stack = "", []
    while not stack or rng.rand() < 0.8 and len(text) < 10:
        if stack and rng.rand() < 0.3:
            text += CLOSE[stack.pop()]
        else:
            stack.append(OPEN[rng.randint(2)])
            text += stack[-1]
    return text


def _behaviour(prompt: str, rng: np.random.RandomState, p_right: float = 0.5) -> str:
    """The behaviour policy: the right step with probability `p_right`, else a random one of `( ) [ ] <stop>`."""
    stack, broken, out = [], False, ""
    for c in prompt:  # the brackets the prompt leaves open
        if c in OPEN:
            stack.append(c)
        elif c in PAIRS:
            stack.pop()
    while len(out) < MAX_COMPLETION:
        right = CLOSE[stack[-1]] if stack else "."  # "." = stop
        action = right if rng.rand() < p_right and not broken else "()[]."[rng.randint(5)]
        if action == ".":
            break
        out += action
        if action in OPEN:
            stack.append(action)
        elif stack and PAIRS[action] == stack[-1]:
            stack.pop()
        else:
            broken = True  # a closing bracket that does not match: the string can no longer balance
    return out


def rows(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    rng = np.random.RandomState(seed)
    out = []
    while len(out) < n:
        prompt = _prompt(rng)
        if prompt in exclude:
            continue
        completion = _behaviour(prompt, rng)
        out.append({"prompt": prompt, "completion": completion, "reward": score([prompt], [completion])[0]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="Write the brackets task's data and a tiny model fine-tuned on it.")
    p.add_argument("--output_dir", default="outputs/brackets")
    p.add_argument("--n_train", type=int, default=2000)
    p.add_argument("--n_held", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from toy import write_starting_point

    held = rows(args.n_held, args.seed + 1)
    train = rows(args.n_train, args.seed, exclude={r["prompt"] for r in held})
    print(f"behaviour success rate: train {np.mean([r['reward'] for r in train]):.3f}, held-out "
          f"{np.mean([r['reward'] for r in held]):.3f}; distinct prompts {len({r['prompt'] for r in train})} / "
          f"{len({r['prompt'] for r in held})}")
    out = write_starting_point(train, held, chars="()[]", output_dir=args.output_dir, seed=args.seed)
    print(f"wrote {out}/train.jsonl, held.jsonl and model/")


if __name__ == "__main__":
    main()
