"""The paper's Table 1 protocol: pre-train with each objective (timed to convergence), fine-tune
from none / contrastive / comparative at each label budget, evaluate on the held-out test split."""

from __future__ import annotations

import json
import math
from pathlib import Path

from jaxseg.config import CHOICES, Config
from jaxseg.errors import UserError
from jaxseg.run_settings import atomic_write_text, is_primary
from jaxseg.evaluate import plot_loss_curves
from jaxseg.train.run import ensure_data, run_evaluation, run_finetuning, run_pretraining

TABLE_METRICS = ("dice", "f1", "hd", "hd95")


def run_table1(cfg: Config, workdir: str | Path, objectives=("contrastive", "comparative"),
               budgets=(2, 0), progress: bool = True, overwrite: bool = False) -> dict:
    """Returns and writes (``table1.json``, ``table1.md``, ``pretrain_loss.png``) every number.
    A budget of 0 means all labelled training cases."""
    root = Path(workdir)
    bad = [o for o in objectives if o not in CHOICES["objective"]]
    if bad or any(b < 0 for b in budgets):
        raise UserError(f"objectives must be among {CHOICES['objective']} and budgets >= 0, got {list(objectives)} "
                        f"and {list(budgets)}")
    ensure_data(cfg, root, progress)
    pre = {}
    for obj in objectives:
        _, summary = run_pretraining(cfg.replace(objective=obj), root, out_name=f"pretrain_{obj}", progress=progress,
                                     overwrite=overwrite)
        pre[obj] = summary
    if is_primary():
        plot_loss_curves({f"{o} {s}": root / f"pretrain_{o}" / s / "metrics.jsonl"
                          for o in objectives for s in ("feat", "recon")}, root / "pretrain_loss.png")
    rows = []
    for budget in budgets:
        for init in ("none", *objectives):
            name = f"finetune_{init}_{budget or 'all'}"
            params_path = None if init == "none" else root / f"pretrain_{init}" / "params.msgpack"
            _, ft = run_finetuning(cfg.replace(label_budget=budget), root, init=params_path, out_name=name,
                                   progress=progress, overwrite=overwrite)
            ev = run_evaluation(cfg, root, root / name / "best.msgpack", out_name=f"{name}/test", progress=progress,
                                overwrite=overwrite)
            rows.append({
                "init": init, "labels": len(ft["label_cases"]), "budget": budget or "all",
                "pretrain_s": pre[init]["train_s"] if init != "none" else 0.0,
                "pretrain_steps": pre[init]["steps"] if init != "none" else 0,
                "best_val_dice": ft["best"]["val_dice"],
                "metrics": {cls: {m: ev["aggregate"][cls][m]["mean"] for m in TABLE_METRICS}
                            for cls in ev["aggregate"]},
            })
    result = {"config": cfg.as_dict(), "pretraining": pre, "rows": rows}
    if is_primary():
        atomic_write_text(root / "table1.json", json.dumps(result, indent=1, default=str))
        atomic_write_text(root / "table1.md", table_markdown(rows))
    return result


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table_markdown(rows) -> str:
    classes = list(rows[0]["metrics"]) if rows else []
    head = "| pre-training | labels | pre-train time (s) | " + " | ".join(
        f"{c} {m.upper()}" for c in classes for m in TABLE_METRICS) + " |"
    lines = [head, "|---" * (3 + len(classes) * len(TABLE_METRICS)) + "|"]
    for r in rows:
        cells = [_fmt(r["metrics"][c][m]) for c in classes for m in TABLE_METRICS]
        lines.append(f"| {r['init']} | {r['labels']} | {r['pretrain_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
