"""One markdown summary of a benchmark results folder (what ``run_gpu.sh`` writes).

    python -m benchmarks.summary RESULTS_DIR > RESULTS_DIR/summary.md

Reads whichever of model_step.json, pretrain.json, inference.json, loss_scaling.json,
compile.json and checkpoint.json exist; a part that timed out shows the rows it wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x, fmt=".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def model_step(d: dict) -> list[str]:
    out = ["## UNETR step (forward; forward + backward + AdamW)", "", f"config: `{json.dumps(d.get('config', {}))}`", ""]
    rows = [[r["kind"], r["variant"], _ms(r["median_s"]), _num(r["first_call_s"]), _num(r.get("tflops_per_s"), ".2f"),
             _pct(r.get("mfu")), _pct(r.get("roofline_fraction")), _num(r.get("peak_mib"), ".0f")]
            for r in d["rows"] if "variant" in r]
    out += _table(["step", "variant", "median ms", "first call s", "TFLOP/s", "MFU", "of roofline", "peak MiB"], rows)
    ratios = [f"- {r['kind']}: {r['ratio']} = **{r['median']:.3f}** (MONAI cudnn.benchmark "
              f"{'on' if r.get('cudnn_benchmark') else 'off'})" for r in d["rows"] if "ratio" in r]
    return out + ([""] + ratios if ratios else [])


def _best_torch(row: dict, dtype: str):
    same = {k: v for k, v in row.get("torch", {}).items() if f" {dtype} " in f" {k} "}
    return min(same.values(), key=lambda v: v["median_s"]) if same else None


def pretrain(d: dict) -> list[str]:
    out = ["## Pre-training step (three axes in turn, batch 4)", ""]
    rows = []
    for r in d["rows"]:
        if r.get("source") == "torch_loop":
            continue
        t32, t16 = _best_torch(r, "float32"), _best_torch(r, "bfloat16")
        ratio = r.get(f"ratio_jaxseg_over_torch_{r['dtype']}")
        rows.append([r["stage"], r["objective"], r["source"], r["dtype"], _ms(r["median_s"]), _num(r["compile_s"]),
                     _num(r.get("tflops_per_s"), ".2f"), _pct(r.get("mfu")), _pct(r.get("roofline_fraction")),
                     _num(r.get("peak_mib"), ".0f"), _ms(t32 and t32["median_s"]), _ms(t16 and t16["median_s"]),
                     _num(ratio, ".3f")])
    out += _table(["stage", "objective", "batches", "dtype", "jaxseg ms", "compile s", "TFLOP/s", "MFU", "of roofline",
                   "peak MiB", "torch fp32 ms", "torch bf16 ms", "jaxseg/torch (same dtype)"], rows)
    loops = [r for r in d["rows"] if r.get("source") == "torch_loop"]
    if loops:
        out += ["", "Authors' loop-style losses (PyTorch, fp32, same device):", ""]
        out += _table(["stage", "objective", "s per step", "note"],
                      [[r["stage"], r["objective"], _num(r["extrapolated_step_s"], ".2f"), r["note"]] for r in loops])
    return out


def inference(d: dict) -> list[str]:
    out = ["## Sliding-window inference", ""]
    rows = []
    for r in d["rows"]:
        best = r.get("monai", {}).get(r.get("ratio_against"), {})
        rows.append([r["case"], "x".join(map(str, r["shape"])), str(r["windows"]), r["dtype"], _ms(r["median_s"]),
                     _num(r["first_call_s"]), _pct(r.get("mfu")), r.get("ratio_against", "-"),
                     _ms(best.get("median_s")), _num(r.get("ratio_jaxseg_over_monai"), ".3f"),
                     _num(best.get("max_rel_diff"), ".1e")])
    return out + _table(["case", "shape", "windows", "dtype", "jaxseg ms", "first call s", "MFU", "MONAI variant",
                         "MONAI ms", "ratio", "max rel diff"], rows)


def loss_scaling(d: dict) -> list[str]:
    out = ["## Loss + gradient vs P (N = 4), ms", ""]
    for stage in sorted({r["stage"] for r in d["rows"]}):
        pts = [r for r in d["rows"] if r["stage"] == stage and r["sweep"] == "P"]
        ps = sorted({r["P"] for r in pts})
        names = sorted({r["objective"] for r in pts})
        cell = {(r["objective"], r["P"]): r["median_s"] for r in pts}
        out += [f"{stage}:", ""] + _table(["objective", *(f"P={p}" for p in ps)],
                                         [[n, *(f"{cell[(n, p)] * 1e3:.2f}" if (n, p) in cell else "-" for p in ps)]
                                          for n in names]) + [""]
    return out


def compile_times(d: dict) -> list[str]:
    return ["## Cold compile", ""] + _table(["step", "compile s", "x fine-tune step"], [
        [r["step"], _num(r["compile_s"]), _num(r["ratio_to_finetune"], ".2f")] for r in d["rows"]])


def checkpoint(d: dict) -> list[str]:
    return [f"## Checkpoint save ({d['model']} UNETR train state, {d['devices']} device(s)), s the loop waits", ""] + _table(
        ["handoff to orbax", "GB", "first save s", "later saves s (median)", "on disk after s (first / later)"],
        [[r["handoff"], _num(r["state_gb"], ".2f"), _num(r["first_s"], ".2f"), _num(r["median_later_s"], ".2f"),
          f"{_num(r.get('first_written_s'), '.2f')} / {_num(r.get('median_later_written_s'), '.2f')}"]
         for r in d["rows"]])


PARTS = {"model_step.json": model_step, "pretrain.json": pretrain, "inference.json": inference,
         "compile.json": compile_times, "loss_scaling.json": loss_scaling, "checkpoint.json": checkpoint}


def summarize_dir(folder: str | Path) -> str:
    folder = Path(folder)
    lines = ["# jaxseg benchmark summary", ""]
    machine = None
    for name, fn in PARTS.items():
        path = folder / name
        if not path.is_file():
            lines += [f"_{name}: missing (part not run or cut before its first row)_", ""]
            continue
        d = json.loads(path.read_text())
        machine = machine or d.get("machine")
        lines += fn(d) + [""]
    if machine:
        lines[1:1] = ["", "machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize_dir(sys.argv[1] if len(sys.argv) > 1 else "."))
