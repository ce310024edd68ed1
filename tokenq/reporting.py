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


def plot_optimality_vs_beta(rows: list[dict[str, float]], behaviour: float, path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["beta"] for r in rows], [r["optimality"] for r in rows], "o-", label="Q-guided sampling")
    ax.axhline(behaviour, color="gray", ls="--", label="behaviour data")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(-0.1, 1.5 * max(r["beta"] for r in rows) + 0.1)
    ax.set_xlabel("beta (guidance strength)")
    ax.set_ylabel("optimality")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
