"""The paper's Table 1 protocol, repeated over seeds: pre-train with each objective (timed to
convergence, probed), fine-tune from none / each objective at each label budget, evaluate on the
held-out test split, and report mean +- sd over seeds with the paired difference to ``none``.

Seeds vary initialisation, the labelled subset, crops and augmentation; the data and the
train / val / test split (``data_seed``) stay fixed, so every seed is scored on the same test
cases and differences can be paired by (seed, case).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jaxseg.config import CHOICES, Config
from jaxseg.errors import UserError
from jaxseg.figures import plot_loss_curves
from jaxseg.models.unetr import STAGES
from jaxseg.distributed import is_primary, sole_writer
from jaxseg.io import atomic_write_text
from jaxseg.stats import crossed_bootstrap_ci, mean_sd
from jaxseg.workflow import ensure_data, run_evaluation, run_finetuning, run_pretraining

TABLE_METRICS = ("dice", "hd95")
METRIC_LABELS = {"dice": "Dice", "hd95": "HD95 (mm)"}
STAGE_NAMES = {"random_init": "random init", "encoder": "after stage 1 (encoder)", "decoder": "after stage 2 (decoder)"}


def run_table1(cfg: Config, workdir: str | Path, objectives=("contrastive", "comparative"),
               budgets=(2,), seeds: int = 1, progress: bool = True, overwrite: bool = False) -> dict:
    """Returns and writes (``table1.json``, ``table1.md``, ``pretrain_loss.png``) every number.
    A budget of 0 means all labelled training cases. Runs seed ``cfg.seed + k`` for k < ``seeds``
    under ``workdir/seed<n>/``; budgets in the order given, each over every seed, so the first
    budget's table is complete before the next one starts."""
    with sole_writer(workdir):  # one table1 per work dir at a time
        root = Path(workdir)
        bad = [o for o in objectives if o not in CHOICES["objective"]]
        if bad or any(b < 0 for b in budgets) or seeds < 1:
            raise UserError(f"objectives must be among {CHOICES['objective']}, budgets >= 0 and seeds >= 1, got "
                            f"{list(objectives)}, {list(budgets)} and {seeds}")
        data = ensure_data(cfg, root, progress)  # validated and split once; every run below reuses it
        seed_list = [cfg.seed + k for k in range(seeds)]
        pre: dict[tuple[int, str], dict] = {}

        def pretrained(seed: int, obj: str) -> dict:
            if (seed, obj) not in pre:
                _, pre[seed, obj] = run_pretraining(cfg.replace(seed=seed, objective=obj), root,
                                                    out_name=f"seed{seed}/pretrain_{obj}", progress=progress,
                                                    overwrite=overwrite, data=data)
            return pre[seed, obj]

        runs = []
        for budget in budgets:
            for seed in seed_list:
                for init in ("none", *objectives):
                    p = pretrained(seed, init) if init != "none" else None
                    name = f"seed{seed}/finetune_{init}_{budget or 'all'}"
                    params_path = None if p is None else root / f"seed{seed}/pretrain_{init}/params.msgpack"
                    scfg = cfg.replace(seed=seed, label_budget=budget)
                    _, ft = run_finetuning(scfg, root, init=params_path, out_name=name, progress=progress,
                                           overwrite=overwrite, data=data)
                    ev = run_evaluation(scfg, root, root / name / "best.msgpack", out_name=f"{name}/test",
                                        progress=progress, overwrite=overwrite, data=data)
                    runs.append({"seed": seed, "init": init, "budget": budget or "all", "labels": len(ft["label_cases"]),
                                 "pretrain_s": p["train_s"] if p else 0.0, "pretrain_steps": p["steps"] if p else 0,
                                 "best_val_dice": ft["best"]["val_dice"], "cases": ev["per_case"]})
        result = {"config": cfg.flat(), "seeds": seed_list, "runs": runs, "rows": summary_rows(runs),
                  "pretraining": {f"seed{s}/{o}": v for (s, o), v in pre.items()},
                  "probe": probe_rows(pre), "convergence": convergence_rows(pre)}
        if is_primary():
            chance = {o: v["stages"][STAGES[0]].get("chance_loss") for (_, o), v in pre.items()}
            plot_loss_curves({f"stage {k + 1} ({st})": {f"{o} seed {sd}": root / f"seed{sd}/pretrain_{o}" / st / "metrics.jsonl"
                                                        for o in objectives for sd in seed_list}
                              for k, st in enumerate(STAGES)}, root / "pretrain_loss.png",
                             title=f"pre-training loss, {len(seed_list)} seed(s); dashed: the loss at chance",
                             chance=chance)
            atomic_write_text(root / "table1.json", json.dumps(result, indent=1, default=str))
            atomic_write_text(root / "table1.md", report_markdown(result))
        return result


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
            if init != "none":
                row["paired_dice"][cls] = paired_difference(mine, [
                    next(b for b in runs if (b["budget"], b["init"], b["seed"]) == (budget, "none", r["seed"]))
                    for r in mine], cls)
        rows.append(row)
    return rows


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
