"""The paper's Table 1 protocol, repeated over seeds: pre-train with each objective (timed to
convergence, probed), fine-tune from none / each objective at each label budget, evaluate on the
held-out test split; ``jaxseg.report`` turns the runs into the tables (mean +- sd over seeds,
paired differences to ``none`` with intervals over seeds and test cases) and figures.

Seeds vary initialisation, the labelled subset, crops and augmentation; the data and the
train / val / test split (``data_seed``) stay fixed, so every seed is scored on the same test
cases and differences can be paired by (seed, case).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxseg.config import CHOICES, Config
from jaxseg.errors import UserError
from jaxseg.figures import plot_loss_curves
from jaxseg.models.unetr import STAGES
from jaxseg.distributed import is_primary, sole_writer
from jaxseg.io import atomic_write_text
from jaxseg.report import convergence_rows, label_efficiency_png, probe_rows, report_markdown, summary_rows
from jaxseg.workflow import ensure_data, run_evaluation, run_finetuning, run_pretraining

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
            label_efficiency_png(result["rows"], root / "label_efficiency.png")
        return result


