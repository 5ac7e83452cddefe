"""Table 1's report: per (budget, init) the test metrics over seeds, the paired difference to no
pre-training with an interval that resamples seeds AND test cases, the probe and convergence
tables, table1.md, and the label-efficiency figure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jaxseg.models.unetr import STAGES
from jaxseg.stats import crossed_bootstrap_ci, mean_sd

TABLE_METRICS = ("dice", "hd95")
METRIC_LABELS = {"dice": "Dice", "hd95": "HD95 (mm)"}
STAGE_NAMES = {"random_init": "random init", "encoder": "after stage 1 (encoder)", "decoder": "after stage 2 (decoder)"}


def _case_values(run: dict, cls: str, metric: str) -> dict[str, float]:
    return {cid: float(m[cls][metric]) for cid, m in run["cases"].items()}


def summary_rows(runs: list[dict]) -> list[dict]:
    """One row per (budget, init): per metric and class the mean +- sd over seeds of each seed's
    test-case mean, and for Dice the paired difference to ``none`` (``paired_difference``)."""
    rows = []
    keys = list(dict.fromkeys((r["budget"], r["init"]) for r in runs))
    for budget, init in keys:
        mine = [r for r in runs if (r["budget"], r["init"]) == (budget, init)]
        classes = list(next(iter(mine[0]["cases"].values()))) if mine[0]["cases"] else []
        row = {"budget": budget, "init": init, "labels": mine[0]["labels"], "seeds": len(mine),
               "pretrain_s": mean_sd([r["pretrain_s"] for r in mine]), "metrics": {}, "paired_dice": {}}
        for cls in classes:
            row["metrics"][cls] = {}
            for metric in TABLE_METRICS:
                per_seed = [mean_sd(list(_case_values(r, cls, metric).values()))[0] for r in mine]
                row["metrics"][cls][metric] = mean_sd(per_seed)
            row.setdefault("dice_ci", {})[cls] = mean_interval(mine, cls)
            if init != "none":
                row["paired_dice"][cls] = paired_difference(mine, [
                    next(b for b in runs if (b["budget"], b["init"], b["seed"]) == (budget, "none", r["seed"]))
                    for r in mine], cls)
        rows.append(row)
    return rows


def mean_interval(runs: list[dict], cls: str, metric: str = "dice") -> dict:
    """The mean of ``metric`` over seeds x test cases and its 95% interval resampling both."""
    cases = sorted(runs[0]["cases"])
    mean, low, high = crossed_bootstrap_ci([[_case_values(r, cls, metric)[c] for c in cases] for r in runs])
    return {"mean": mean, "low": low, "high": high, "seeds": len(runs), "cases": len(cases)}


def paired_difference(runs: list[dict], baselines: list[dict], cls: str, metric: str = "dice") -> dict:
    """The paired difference of ``metric`` between each run and its seed's baseline, per test
    case: the mean, its 95% interval resampling seeds AND test cases (``stats.crossed_bootstrap_ci``:
    the cases are the same in every seed, and the seed is where much of the spread is), the
    number of seeds and cases, and each seed's mean difference (the spread a reader should see)."""
    cases = sorted(runs[0]["cases"])
    table = np.array([[_case_values(r, cls, metric)[c] - _case_values(b, cls, metric)[c] for c in cases]
                      for r, b in zip(runs, baselines)])
    mean, low, high = crossed_bootstrap_ci(table)
    per_seed = [float(np.nanmean(row)) if np.isfinite(row).any() else math.nan for row in table]
    return {"mean": mean, "low": low, "high": high, "seeds": len(runs), "cases": len(cases),
            "n": int(np.isfinite(table).sum()), "per_seed": per_seed, "unit": "seeds x test cases"}


def probe_rows(pre: dict) -> list[dict]:
    """Per objective and model state: probe accuracies and collapse statistics, mean +- sd over seeds."""
    rows = []
    for obj in dict.fromkeys(o for _, o in pre):
        summaries = [v for (_, o), v in pre.items() if o == obj]
        for stage in STAGE_NAMES:
            probes = [s["probe"][stage] for s in summaries if stage in s.get("probe", {})]
            if probes:
                rows.append({"objective": obj, "state": stage, "chance": probes[0]["chance"],
                             **{k: mean_sd([p[k] for p in probes]) for k in
                                ("crop_accuracy", "anatomy_accuracy", "mean_cosine", "feature_spread")}})
    return rows


def convergence_rows(pre: dict) -> list[dict]:
    """Per objective, seed and stage: steps run, where the paper's rule first held, whether the
    step limit cut it, the loss trend over the last steps, and training time."""
    rows = []
    for (seed, obj), s in pre.items():
        for stage in STAGES:
            st = s["stages"][stage]
            rows.append({"objective": obj, "seed": seed, "stage": stage, "steps": st["end_step"],
                         "rule_met_at": st.get("rule_met_at"), "converged_at": st["converged_at"],
                         "capped": st["converged_at"] is None, "loss_trend": st.get("loss_trend"),
                         "final_loss": st["final_loss"], "final_mean_loss": st.get("final_mean_loss"),
                         "chance_loss": st.get("chance_loss"), "loss_vs_chance": st.get("loss_vs_chance"),
                         "learned": st.get("learned"), "train_s": st["train_s"]})
    return rows


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}"


def _pm(ms) -> str:
    m, s = ms
    return _fmt(m) if s is None or math.isnan(s) else f"{_fmt(m)} ± {_fmt(s)}"


def _chance_cell(c: dict) -> str:
    if c.get("loss_vs_chance") is None:
        return "-"
    return f"{100 * c['loss_vs_chance']:.1f}%" + ("" if c["learned"] else " **did not learn**")


def report_markdown(result: dict) -> str:
    """table1.md: segmentation, paired differences, probe and convergence tables."""
    rows, n_seeds = result["rows"], len(result["seeds"])
    classes = list(rows[0]["metrics"]) if rows else []
    out = [f"## Test-set segmentation (mean ± sd over {n_seeds} seed(s) of each seed's mean over the test cases)", "",
           "| pre-training | labels | pre-train time (s) | " + " | ".join(
               f"{c} {METRIC_LABELS[m]}" for c in classes for m in TABLE_METRICS) +
           " | Dice − none [95% CI] | per seed |",
           "|---" * (5 + len(classes) * len(TABLE_METRICS)) + "|"]
    for r in rows:
        cells = [_pm(r["metrics"][c][m]) for c in classes for m in TABLE_METRICS]
        paired = "; ".join(f"{_fmt(p['mean'])} [{_fmt(p['low'])}, {_fmt(p['high'])}]"
                           for p in r["paired_dice"].values()) or "-"
        per_seed = "; ".join(", ".join(f"{v:+.3f}" for v in p["per_seed"]) for p in r["paired_dice"].values()) or "-"
        pre_s = "-" if r["init"] == "none" else _pm(r["pretrain_s"])
        out.append(f"| {r['init']} | {r['labels']} | {pre_s} | " + " | ".join(cells) + f" | {paired} | {per_seed} |")
    some = next((p for r in rows for p in r["paired_dice"].values()), None)
    unit = f"{some['seeds']} seed(s) × {some['cases']} test case(s)" if some else "seeds × test cases"
    out += ["", f"Dice − none: the mean paired difference (each run against no pre-training with the same seed, "
                f"case by case) over {unit}, with a 95% percentile bootstrap interval that resamples seeds and "
                f"test cases both; the last column is each seed's mean difference. An interval that contains 0 "
                f"shows no difference at this size; with few seeds the interval itself is rough.", ""]
    out += label_efficiency_markdown(rows)
    if result["probe"]:
        chance = result["probe"][0]["chance"]
        out += [f"## Representation probe (held-out volumes; linear probe of the partition of a slice from pooled "
                f"enc4 features; chance {chance:.2f})", "",
                "| objective | model | partition in crop | partition of anatomy | mean cosine | feature spread |",
                "|---|---|---|---|---|---|"]
        for p in result["probe"]:
            out.append(f"| {p['objective']} | {STAGE_NAMES[p['state']]} | {_pm(p['crop_accuracy'])} | "
                       f"{_pm(p['anatomy_accuracy'])} | {_pm(p['mean_cosine'])} | {_pm(p['feature_spread'])} |")
        out += ["", "Collapse would show as mean cosine near 1 and feature spread near 0.", ""]
    if result["convergence"]:
        out += ["## Pre-training convergence (the paper's rule: loss within 1% of the mean of the previous 10)", "",
                "| objective | seed | stage | steps | rule first met | stopped by | loss trend (last 10 vs 10 before) "
                "| final loss (mean of last 10) | loss at chance | final / chance | train time (s) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in result["convergence"]:
            stop = "step limit" if c["capped"] else "rule"
            trend = "-" if c["loss_trend"] is None else f"{100 * c['loss_trend']:+.1f}%"
            out.append(f"| {c['objective']} | {c['seed']} | {c['stage']} | {c['steps']} | "
                       f"{c['rule_met_at'] if c['rule_met_at'] is not None else 'never'} | {stop} | {trend} | "
                       f"{_fmt(c.get('final_mean_loss'))} | {_fmt(c.get('chance_loss'))} | "
                       f"{_chance_cell(c)} | {c['train_s']:.1f} |")
        out += ["", "final / chance: the final loss as a fraction of the loss when all similarities are equal "
                    "(comparative: ln 2; contrastive: ln P); a stage within 2% of chance (or above it) did not learn.",
                ""]
    return "\n".join(out) + "\n"


def label_efficiency_markdown(rows: list[dict]) -> list[str]:
    """With more than one label budget: test Dice against the number of labelled cases, one
    column per start, with its interval over seeds x test cases (the rows of the figure)."""
    labels = sorted({r["labels"] for r in rows})
    if len(labels) < 2:
        return []
    inits = list(dict.fromkeys(r["init"] for r in rows))
    out = []
    for cls in rows[0].get("dice_ci", {}):
        out += [f"## Label efficiency: {cls} test Dice against labelled cases (mean over seeds × test cases, "
                f"95% interval resampling both)", "", "| labelled cases | " + " | ".join(inits) + " |",
                "|---" * (1 + len(inits)) + "|"]
        for n in labels:
            cells = []
            for init in inits:
                ci = next((r["dice_ci"][cls] for r in rows if r["labels"] == n and r["init"] == init), None)
                cells.append("-" if ci is None else f"{_fmt(ci['mean'])} [{_fmt(ci['low'])}, {_fmt(ci['high'])}]")
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def label_efficiency_png(rows: list[dict], path: str | Path) -> bool:
    """``label_efficiency.png``: test Dice (mean, 95% interval over seeds x test cases) against
    labelled cases, one line per start, one panel per class; drawn only with several budgets."""
    if len({r["labels"] for r in rows}) < 2:
        return False
    from jaxseg.figures import plot_label_efficiency

    plot_label_efficiency(rows, path)
    return True
