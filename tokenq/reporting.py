"""Results of a recipe run: the printed table, `metrics.json` and the optimality-vs-beta plot."""

from __future__ import annotations

import json
import os
from pathlib import Path


def results_table(rows: list[dict[str, float]], behaviour: float) -> str:
    """A markdown table of guided decoding results, one row per beta, behaviour level first."""
    lines = ["| beta | optimality | length | reached goal |", "|---:|---:|---:|---:|",
             f"| data (behaviour) | {behaviour:.3f} | | |"]
    lines += [f"| {r['beta']:g} | {r['optimality']:.3f} | {r['length']:.2f} | {r['reached']:.1%} |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON atomically (temp file + rename): a crash never leaves a truncated file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def learning_curve(log_history: list[dict]) -> list[dict[str, float]]:
    """The guided evaluations during training (`eval_optimality` entries of `trainer.state.log_history`)."""
    return [{"step": h["step"], **{k.removeprefix("eval_"): h[k] for k in ("eval_optimality", "eval_length", "eval_reached")}}
            for h in log_history if "eval_optimality" in h]


def plot_optimality_vs_beta(rows: list[dict[str, float]], behaviour: float, path: str | os.PathLike, title: str = "",
                            curve: list[dict[str, float]] | None = None) -> None:
    """Optimality against beta after training and, when there is a learning curve, beside it optimality of
    the guided policy (largest beta) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(9.5 if curve else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["beta"] for r in rows], [r["optimality"] for r in rows], "o-", label="Q-guided sampling")
    ax.axhline(behaviour, color="gray", ls="--", label="behaviour data")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(-0.1, 1.5 * max(r["beta"] for r in rows) + 0.1)
    ax.set_xlabel("beta (guidance strength)")
    ax.set_ylabel("optimality")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower right")
    if curve:
        ax = axes[0][1]
        ax.plot([c["step"] for c in curve], [c["optimality"] for c in curve], "o-", label=f"beta = {max(r['beta'] for r in rows):g}")
        ax.axhline(behaviour, color="gray", ls="--", label="behaviour data")
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1.05)
        ax.set_title("during training")
        ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


KNOBS = ("beta", "num_beams", "num_candidates", "num_continuations", "step_tokens", "step_beam")


def knob_label(row: dict) -> str:
    return ", ".join(f"{k}={row[k]:g}" for k in KNOBS if k in row)


def sweep_table(rows: list[dict]) -> str:
    """Markdown table of a decoding sweep (one row per configuration)."""
    lines = ["| strategy | settings | reward | KL | tokens / prompt | forward rows / prompt |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        kl = "" if r["kl"] is None else f"{r['kl']:.2f}"
        lines.append(f"| {r['strategy']} | {knob_label(r)} | {r['reward']:.3f} | {kl} | {r['generated_tokens']:.1f} | {r['forward_passes']:.1f} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], x: str, path: str | os.PathLike, xlabel: str, baseline: float | None = None) -> None:
    """Reward against `x` (e.g. "kl", "generated_tokens"), one curve per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        points = sorted((r[x], r["reward"]) for r in rows if r["strategy"] == strategy and r[x] is not None)
        if points:
            ax.plot(*zip(*points), "o-", label=strategy)
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", label="behaviour data")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
