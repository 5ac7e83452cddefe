"""One table from several table1 runs (a settings sweep): per run folder and objective, the
stage-2 loss against chance, the anatomy probe after each stage, validation Dice (what a default
is chosen on) and the paired test Dice gain over no pre-training.

    python -m benchmarks.sweep_summary runs/sweep_T1 runs/sweep_T0.1 runs/sweep_logits
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from jaxseg.report import summary_rows


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _f(x, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _mm(spacing) -> str:
    return f"{spacing[0]:g}" if len(set(spacing)) == 1 else "x".join(f"{v:g}" for v in spacing)


def _augment(cfg) -> str:
    """Pre-training augmentation, for runs that record it (since 2026-12-02)."""
    mode = cfg.get("pretrain_augment")
    if mode is None:
        return ""
    if mode == "none":  # the flip and rot90 probabilities are not used
        return "pre-training augment none, "
    return (f"pre-training augment {mode} (flips {cfg['pretrain_flip_prob']:g}, "
            f"rot90 {cfg['pretrain_rot90_prob']:g}), ")


def rows(folder: Path) -> list[str]:
    res = json.loads((folder / "table1.json").read_text())
    cfg = res["config"]
    label = (f"{cfg['crop_size']}^3 at {_mm(cfg['target_spacing'])} mm, T={cfg['temperature']}, stage 2 on "
             f"{cfg['stage2_output']}, min_steps={cfg['min_steps']}, "
             f"{_augment(cfg)}"
             f"{cfg['phantom'] if not cfg['data_dir'] else Path(cfg['data_dir']).name}")
    out = []
    none_val = _mean([r["best_val_dice"] for r in res["runs"] if r["init"] == "none"])
    for obj in dict.fromkeys(o for r in res["runs"] if (o := r["init"]) != "none"):
        conv = [c for c in res["convergence"] if c["objective"] == obj]
        probe = {p["state"]: p["anatomy_accuracy"][0] for p in res["probe"] if p["objective"] == obj}
        frac = {st: _mean([c.get("loss_vs_chance") for c in conv if c["stage"] == st]) for st in ("encoder", "decoder")}
        not_learned = sum(1 for c in conv if c.get("learned") is False)
        steps = {st: [c["steps"] for c in conv if c["stage"] == st] for st in ("encoder", "decoder")}
        val = _mean([r["best_val_dice"] for r in res["runs"] if r["init"] == obj])
        row = next(r for r in summary_rows(res["runs"]) if r["init"] == obj)  # today's interval, whenever run
        gains = "; ".join(f"{c} {p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] ({p['seeds']}×{p['cases']})"
                          for c, p in row["paired_dice"].items())
        out.append(f"| {label} | {obj} | {_f(frac['encoder'], True)} | {_f(frac['decoder'], True)} | "
                   f"{not_learned} of {len(conv)} | {min(steps['decoder'])}-{max(steps['decoder'])} | "
                   f"{_f(probe.get('random_init'))} / {_f(probe.get('encoder'))} / {_f(probe.get('decoder'))} | "
                   f"{_f(val)} (none {_f(none_val)}) | {gains} |")
    return out


def main(folders: list[str]) -> None:
    print("| settings | objective | stage 1 final / chance | stage 2 final / chance | stages that did not learn "
          "| stage 2 steps | anatomy probe: init / stage 1 / stage 2 | validation Dice "
          "| test Dice - none [95% CI resampling seeds and cases] (seeds×cases) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f in folders:
        for line in rows(Path(f)):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
