"""The verdict of a run: did the value function learn, and does guided decoding help? In plain words, from the
figures a run already measured, so that a run whose heads learned nothing says so instead of leaving the user to
read `value_diagnostics`.

- **value learned**: Q at the data's actions ranks the held-out return-to-go better than chance (V(s_0) against
  the row's return for objectives without Q heads, e.g. DQO). Chance is a permutation bound, not a threshold:
  the returns are shuffled between held-out rows (a row's tokens share one outcome, so shuffling tokens would
  make chance look far too narrow), `tokenq.diagnostics.permutation_p`; learned when the rank correlation's
  one-sided p < 0.01, and where the returns are 0/1 the ROC AUC's too.
- **guidance helps**: the best guided configuration beats plain sampling and the data's own reward, each by more
  than 2 standard errors of the per-prompt difference (paired over prompts where both sides were measured on the
  same prompts), the margin Bonferroni-corrected for having picked the best of k configurations:
  `z_k = Phi^-1(1 - Phi(-2) / k)` (2 for one configuration, 2.43 for three). None without a reward function.

A negative verdict is a finding, not an error: the run finishes and exits as before; the message comes first in
the log, the results table, `metrics.json` (`verdict`) and the model card, with what to try.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from tokenq.reporting import knob_label

ALPHA = 0.01  # the permutation test's level
SE_MARGIN = 2.0  # standard errors a guided configuration must win by (before the correction for picking the best)
TUNE_ADVICE = ("run `tokenq tune` with the same data flags: it searches learning rates, steps, expectile, backbone "
               "mode and Q-head rank on the held-out value diagnostics and writes a config `tokenq iql --config` runs")


def margin(k: int) -> float:
    """Standard errors the best of `k` configurations must win by: 2 for one, Bonferroni-corrected for k."""
    normal = NormalDist()
    return normal.inv_cdf(1 - normal.cdf(-SE_MARGIN) / max(1, k))


def value_verdict(diagnostics: dict | None) -> dict:
    """`{"value_learned": bool | None, "estimate", "rows", "spearman", "spearman_p", "roc_auc", "roc_auc_p"}` from
    `tokenq.diagnostics.value_diagnostics` (None: no held-out rows to judge by)."""
    if not diagnostics:
        return {"value_learned": None}
    estimate = "q" if "q" in diagnostics else "v0"
    report = diagnostics[estimate]
    tests = ["spearman_p"] + (["roc_auc_p"] if report.get("roc_auc") is not None else [])
    learned = all(report.get(p) is not None and report[p] < ALPHA for p in tests)
    return {"value_learned": learned, "estimate": estimate, "rows": diagnostics["rows"],
            **{k: report.get(k) for k in ("spearman", "spearman_p", "roc_auc", "roc_auc_p")}}


def is_plain(row: dict) -> bool:
    """A sweep row of plain sampling from the policy (beta 0, no critic reading)."""
    return row.get("strategy") == "sample" and not row.get("beta") and "eta" not in row


def paired_gain(guided: np.ndarray, reference: np.ndarray | float) -> tuple[float, float]:
    """(mean gain, its standard error over prompts) of per-prompt rewards against a reference measured on the
    same prompts (an array) or known as one number (a float: only the guided side varies)."""
    diff = guided - reference
    se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    return float(np.mean(diff)), se


def guidance_verdict(rows: list[dict], behaviour: float | None, behaviour_per_prompt: list[float] | None = None,
                     plain: dict | None = None) -> dict:
    """Whether the best guided row of `rows` (`tokenq.evaluation.sweep` rows, with `prompt_rewards`) beats plain
    sampling and the data's reward (`behaviour`, per prompt when known). Plain sampling is the plain row among
    `rows`, or `plain` when given (then every row of `rows` is a candidate: DQO's trained policy against the
    model it started from)."""
    if plain is None:
        plain = next((r for r in rows if is_plain(r)), None)
        rows = [r for r in rows if r is not plain]
    guided = rows
    if not guided or "prompt_rewards" not in guided[0]:
        return {"guidance_helps": None}
    best = max(guided, key=lambda r: r["reward"])
    z = margin(len(guided))
    mine = np.asarray(best["prompt_rewards"])
    references = {}
    if plain is not None:
        references["plain"] = np.asarray(plain["prompt_rewards"])
    if behaviour is not None:
        references["data"] = np.asarray(behaviour_per_prompt) if behaviour_per_prompt is not None else behaviour
    out = {"best": {k: v for k, v in best.items() if k != "prompt_rewards"},
           "configurations": len(guided), "margin_se": z, "prompts": len(mine)}
    for name, reference in references.items():
        gain, se = paired_gain(mine, reference)
        out[f"gain_over_{name}"], out[f"se_over_{name}"] = gain, se
    out["guidance_helps"] = bool(references) and all(out[f"gain_over_{n}"] > z * out[f"se_over_{n}"] for n in references)
    return out


def value_sentence(value: dict) -> tuple[bool, str]:
    """(negative?, the value half of the verdict in words)."""
    if value["value_learned"] is None:
        return False, "No held-out rows: whether the value function learned is unknown (give --eval_dataset or --eval_split)."
    what = "Q at the data's actions" if value["estimate"] == "q" else "V(s_0)"
    p = value["spearman_p"] if value["spearman_p"] is not None else 1.0
    figures = (f"rank correlation of {what} with the held-out return {value['spearman'] or 0:.3f}, p = {p:.3g} against "
               f"returns shuffled between {value['rows']} rows")
    if value["roc_auc"] is not None:
        figures += f"; ROC AUC {value['roc_auc']:.3f}, p = {value['roc_auc_p']:.3g}"
    if value["value_learned"]:
        return False, f"The value function learned ({figures})."
    return True, (f"THE VALUE FUNCTION DID NOT LEARN: its estimates rank the held-out returns no better than chance "
                  f"({figures}; learned needs p < {ALPHA}), so guiding with it is noise. Try: {TUNE_ADVICE}; or more rows, "
                  "a higher --learning_rate / --head_learning_rate, more --max_steps.")


def guidance_sentence(guidance: dict) -> tuple[bool, str]:
    """(negative?, the guidance half of the verdict in words)."""
    best = guidance["best"]
    gains = ", ".join(f"{guidance[f'gain_over_{n}']:+.3f} ± {guidance[f'se_over_{n}']:.3f} over {label}"
                      for n, label in (("plain", "plain sampling"), ("data", "the data")) if f"gain_over_{n}" in guidance)
    figures = (f"best: {best['strategy']} {knob_label(best)}, reward {best['reward']:.3f}; {gains} (standard errors over "
               f"{guidance['prompts']} prompts; needs > {guidance['margin_se']:.2f} SE, the best of "
               f"{guidance['configurations']} configurations)")
    if guidance["guidance_helps"]:
        return False, f"Guided decoding helps ({figures})."
    return True, (f"GUIDED DECODING DOES NOT CLEARLY HELP: it does not beat plain sampling and the data's reward by the "
                  f"margin ({figures}). Try larger --eval_betas, search strategies (`tokenq sweep`), or {TUNE_ADVICE}.")


def message(value: dict, guidance: dict) -> str:
    """The verdict in words, negative findings first."""
    parts = [value_sentence(value)]
    if guidance["guidance_helps"] is not None:
        parts.append(guidance_sentence(guidance))
    return " ".join(text for _, text in sorted(parts, key=lambda p: not p[0]))


def behaviour_of(task) -> tuple[float | None, list[float] | None]:
    """(the data's mean reward, per evaluation prompt when the task knows it: `behavior_rewards()`)."""
    per_prompt = task.behavior_rewards() if hasattr(task, "behavior_rewards") else None
    return (float(np.mean(per_prompt)) if per_prompt else task.behavior_reward()), per_prompt


def verdict(diagnostics: dict | None, rows: list[dict] | None, behaviour: float | None,
            behaviour_per_prompt: list[float] | None = None, plain: dict | None = None) -> dict:
    """`metrics.json`'s `verdict`: `value_learned` (bool; None without held-out rows), `guidance_helps` (bool; None
    without scored decoding), `message`, and the figures used (`value`, `guidance`)."""
    value = value_verdict(diagnostics)
    guidance = guidance_verdict(rows or [], behaviour, behaviour_per_prompt, plain) if rows else {"guidance_helps": None}
    return {"value_learned": value["value_learned"], "guidance_helps": guidance["guidance_helps"],
            "message": message(value, guidance), "value": value, "guidance": guidance}
