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
        result = _result(cfg.flat(), seed_list, runs, pre)
        if is_primary():
            _write(result, root, {s: root for s in seed_list})
        return result


def _result(config: dict, seeds: list[int], runs: list[dict], pre: dict) -> dict:
    """table1.json: the runs, their summaries (``jaxseg.report``) and the pre-training summaries
    (``pre``: (seed, objective) -> summary)."""
    return {"config": config, "seeds": seeds, "runs": runs, "rows": summary_rows(runs),
            "pretraining": {f"seed{s}/{o}": v for (s, o), v in pre.items()},
            "probe": probe_rows(pre), "convergence": convergence_rows(pre)}


def _write(result: dict, root: Path, homes: dict[int, Path]) -> None:
    """table1.json, table1.md and the figures in ``root``; ``homes``: the work dir holding each
    seed's runs (their loss curves)."""
    pre = _pretraining(result)
    objectives = list(dict.fromkeys(o for _, o in pre))
    chance = {o: v["stages"][STAGES[0]].get("chance_loss") for (_, o), v in pre.items()}
    plot_loss_curves({f"stage {k + 1} ({st})": {f"{o} seed {sd}": homes[sd] / f"seed{sd}/pretrain_{o}" / st / "metrics.jsonl"
                                                for o in objectives for sd in result["seeds"]}
                      for k, st in enumerate(STAGES)}, root / "pretrain_loss.png",
                     title=f"pre-training loss, {len(result['seeds'])} seed(s); dashed: the loss at chance",
                     chance=chance)
    atomic_write_text(root / "table1.json", json.dumps(result, indent=1, default=str))
    atomic_write_text(root / "table1.md", report_markdown(result))
    label_efficiency_png(result["rows"], root / "label_efficiency.png")


def _pretraining(result: dict) -> dict:
    """table1.json's pre-training summaries by (seed, objective), as ``run_table1`` holds them."""
    return {(int(k.split("/", 1)[0].removeprefix("seed")), k.split("/", 1)[1]): v
            for k, v in result["pretraining"].items()}


def merge_table1(workdirs, out: str | Path) -> dict:
    """One Table 1 from table1 runs of the same settings over other seeds (a work dir per seed,
    say, run side by side or as a job array): every run together and every statistic recomputed
    over all their seeds, as one table1 over those seeds would report them. Writes table1.json
    (with ``merged_from``: seed -> work dir), table1.md and the figures in ``out``; the runs stay
    where they are, and a merged table can be merged again (more seeds later)."""
    out = Path(out)
    parts = []
    for wd in map(Path, workdirs):
        path = wd / "table1.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist: has table1 finished in {wd}?")
        try:
            parts.append((wd, json.loads(path.read_text())))
        except ValueError as e:
            raise UserError(f"{path} is not a table1.json ({e})") from None
    if len(parts) < 2:
        raise UserError(f"merging needs the work dirs of two table1 runs or more, got {len(parts)}")
    first_wd, first = parts[0]
    same = {k: v for k, v in first["config"].items() if k != "seed"}
    shape = sorted({(str(r["budget"]), r["init"]) for r in first["runs"]})
    cases = sorted(first["runs"][0]["cases"])
    homes: dict[int, Path] = {}
    for wd, part in parts:
        other = {k: v for k, v in part["config"].items() if k != "seed"}
        if other != same:
            diff = ", ".join(f"{k} {other.get(k)!r} (in {first_wd}: {same.get(k)!r})"
                             for k in sorted(same.keys() | other.keys()) if other.get(k) != same.get(k))
            raise UserError(f"{wd} was run with other settings than {first_wd}: {diff}")
        if sorted({(str(r["budget"]), r["init"]) for r in part["runs"]}) != shape:
            raise UserError(f"{wd} has other pre-trainings or label budgets than {first_wd}")
        if any(sorted(r["cases"]) != cases for r in part["runs"]):
            raise UserError(f"{wd} was tested on other cases than {first_wd}: differences are paired by test case")
        for seed in part["seeds"]:
            home = Path(part.get("merged_from", {}).get(str(seed), wd))  # a merge of merges: where the runs are
            if seed in homes:
                raise UserError(f"seed {seed} is in both {homes[seed]} and {home}")
            homes[seed] = home
    if out.resolve() in {wd.resolve() for wd in homes.values()}:
        raise UserError(f"{out} holds one of the runs being merged: write the merged table to a folder of its own")
    if (out / "table1.json").is_file() and "merged_from" not in json.loads((out / "table1.json").read_text()):
        raise UserError(f"{out} holds a table1 run's own table1.json: write the merged table to a folder of its own")
    seeds = sorted(homes)
    budgets = list(dict.fromkeys(r["budget"] for r in first["runs"]))  # table1's order: budget, seed, init
    runs = sorted((r for _, part in parts for r in part["runs"]), key=lambda r: (budgets.index(r["budget"]), r["seed"]))
    pre = dict(sorted(((k, v) for _, part in parts for k, v in _pretraining(part).items()), key=lambda kv: kv[0][0]))
    result = {**_result({**first["config"], "seed": seeds[0]}, seeds, runs, pre),
              "merged_from": {str(s): str(homes[s]) for s in seeds}}
    out.mkdir(parents=True, exist_ok=True)
    with sole_writer(out):
        _write(result, out, homes)
    return result
