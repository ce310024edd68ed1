"""Results of a run, whatever the task: the printed table, `metrics.json`, the reward-vs-beta plot and sweep plots.

Rows are `tokenq.evaluation.sweep` rows: the decoding configuration (`strategy` and `tokenq.generate` knobs),
the task's mean `reward` and its named extras, and the compute (`kl`, `generated_tokens`, `forward_passes`,
`value_score`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenq.atomic import replace_file

KNOBS = ("beta", "eta", "num_beams", "num_candidates", "num_continuations", "step_tokens", "step_stop_strings", "step_beam",
         "resample_temperature", "vote", "aggregate", "c_puct")
STATS = ("kl", "generated_tokens", "forward_passes", "critic_forward_passes", "value_score", "prompt_rewards")


def write_json(path: str | os.PathLike, payload) -> None:
    """Write JSON whole or not at all (`tokenq.atomic.replace_file`): a crash never leaves a truncated file behind."""
    text = json.dumps(payload, indent=2)
    replace_file(path, lambda tmp: tmp.write_text(text))


def extras_of(rows: list[dict]) -> list[str]:
    """The task's named extra metrics in sweep rows (every key that is not a knob, `reward` or compute)."""
    known = {"strategy", "reward", *KNOBS, *STATS}
    return list(dict.fromkeys(k for r in rows for k in r if k not in known))


def knob_label(row: dict) -> str:
    return ", ".join(f"{k}={row[k]:g}" if isinstance(row[k], (int, float)) else f"{k}={row[k]}" for k in KNOBS if k in row)


def _number(value) -> str:
    return "" if value is None else f"{value:.3f}"


def results_table(rows: list[dict], behavior_reward: float | None = None) -> str:
    """Markdown table of decoding results, one row per configuration: the reward, the task's extras, the KL
    estimate and the compute per prompt; the behaviour data's reward first, when known."""
    extras = extras_of(rows)
    head = ["strategy", "settings", "reward", *extras, "KL", "tokens / prompt", "forward rows / prompt"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    if behavior_reward is not None:
        lines.append(f"| data (behaviour) | | {behavior_reward:.3f} |" + " |" * (len(head) - 3))
    for r in rows:
        cells = [r["strategy"], knob_label(r), _number(r["reward"]), *(_number(r.get(k)) for k in extras),
                 _number(r.get("kl")), f"{r['generated_tokens']:.1f}", f"{r['forward_passes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learning_curve(log_history: list[dict]) -> list[dict[str, float]]:
    """The guided evaluations during training: the `eval_reward` entries of `trainer.state.log_history`, with
    the task's extras and the beta."""
    return [{"step": h["step"], **{k.removeprefix("eval_"): v for k, v in h.items() if k.startswith("eval_")}}
            for h in log_history if "eval_reward" in h]


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        replace_file(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reward_vs_beta(rows: list[dict], behavior_reward: float | None, path: str | os.PathLike, title: str = "",
                        curve: list[dict[str, float]] | None = None) -> None:
    """The task's reward against beta after training and, when there is a learning curve, beside it the reward
    of the guided policy (largest beta) against the training step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(9.5 if curve else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["beta"] for r in rows], [r["reward"] for r in rows], "o-", label="Q-guided sampling")
    if behavior_reward is not None:
        ax.axhline(behavior_reward, color="gray", ls="--", label="behaviour data")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(-0.1, 1.5 * max(r["beta"] for r in rows) + 0.1)
    ax.set_xlabel("beta (guidance strength)")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend(loc="best")
    if curve:
        ax = axes[0][1]
        ax.plot([c["step"] for c in curve], [c["reward"] for c in curve], "o-", label=f"beta = {curve[-1].get('beta', '')}")
        if behavior_reward is not None:
            ax.axhline(behavior_reward, color="gray", ls="--", label="behaviour data")
        ax.set_xlabel("training step")
        ax.set_ylabel("reward")
        ax.set_title("during training")
        ax.legend(loc="best")
    _save(fig, path)


def plot_sweep(rows: list[dict], x: str, path: str | os.PathLike, xlabel: str, baseline: float | None = None,
               baseline_label: str = "behaviour data", curve: str = "strategy", log_x: bool = False) -> None:
    """Reward against `x` (e.g. "kl", "generated_tokens"), one curve per value of `curve` (the strategy), each with its
    own colour and marker; the legend beside the axes."""
    plt = _pyplot()
    labels = list(dict.fromkeys(r[curve] for r in rows))
    fig, ax = plt.subplots(figsize=(5.5 + 2.5 * (len(labels) > 8), 3.8 + 0.6 * (len(labels) > 8)))
    colours, markers = plt.get_cmap("tab20").colors, "osD^vP*Xh<>"
    for i, label in enumerate(labels):
        points = sorted((r[x], r["reward"]) for r in rows if r[curve] == label and r[x] is not None)
        if points:
            ax.plot(*zip(*points), marker=markers[i % len(markers)], color=colours[(2 * i) % 20 + (i >= 10)], label=label)
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", label=baseline_label)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    _save(fig, path)


ROUND_COLUMNS = ("policy_reward", "guided_reward", "rows", "tokens_per_prompt", "guided_tokens_per_prompt", "kl_to_initial")


def rounds_table(history: list[dict]) -> str:
    """The rounds of `tokenq iterate` as a markdown table (README, card, console)."""
    lines = ["| round | " + " | ".join(ROUND_COLUMNS) + " |", "|---:|" + "---:|" * len(ROUND_COLUMNS)]
    for h in history:
        cells = [f"{h[c]:.4g}" if isinstance(h[c], float) else str(h[c]) for c in ROUND_COLUMNS]
        lines.append(f"| {h['round']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rounds(history: list[dict], behavior_reward: float | None, path: str | os.PathLike, title: str = "") -> None:
    """Reward against round: plain sampling of each round's extracted policy, and guided sampling with its Q."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    rounds = [h["round"] for h in history]
    ax.plot(rounds, [h["policy_reward"] for h in history], "o-", label="extracted policy, plain sampling")
    ax.plot(rounds, [h["guided_reward"] for h in history], "s--", label="guided sampling with Q")
    if behavior_reward is not None:
        ax.axhline(behavior_reward, color="gray", linestyle=":", label="behaviour data")
    ax.set(xlabel="round", ylabel="reward", title=title, xticks=rounds)
    ax.legend(fontsize=8)
    _save(fig, path)
