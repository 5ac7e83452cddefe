"""Entry points and benchmark scripts run end to end at a tiny size (smoke tests, no timings asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(module, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_model_summary():
    out = run_module("experiments.model_summary", "--preset=tiny", "--img_size=32")
    assert "finite: True" in out and "(1, 32, 32, 32, 2)" in out


def test_model_step_benchmark(tmp_path):
    path = tmp_path / "ms.json"
    out = run_module("benchmarks.model_step", "--preset=tiny", "--img_size=32", "--against=none",
                     "--steps=2", "--warmup=0", f"--json_out={path}")
    assert "train_step" in out
    res = json.loads(path.read_text())
    assert res["train_step"]["jaxseg"]["n"] == 2 and res["train_step"]["jaxseg"]["median_s"] > 0


def test_loss_scaling_benchmark(tmp_path):
    path, png = tmp_path / "ls.json", tmp_path / "ls.png"
    run_module("benchmarks.loss_scaling", "--partitions=4,8", "--images=2", "--stages=decoder",
               "--steps=1", "--k=8", f"--json_out={path}", f"--png={png}")
    rows = json.loads(path.read_text())["rows"]
    assert {r["objective"] for r in rows} >= {"comparative", "contrastive", "comparative_sampled"}
    assert png.stat().st_size > 1000


def test_prepare_phantom_and_pipeline_benchmark(tmp_path):
    out = run_module("experiments.prepare", "--phantom=braintumour", "--phantom_subjects=2",
                     f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'cache'}", "--workers=1")
    assert "'done': 2" in out
    index = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert index["regions"] == {"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]} and len(index["training"]) == 2
    path = tmp_path / "pipe.json"
    run_module("benchmarks.pipeline", f"--work_dir={tmp_path / 'pipe'}", "--subjects=2", "--crop_size=32",
               "--steps=2", "--warmup=1", "--threads=1", f"--json_out={path}")
    rows = json.loads(path.read_text())["rows"]
    assert {r["pipeline"] for r in rows} == {"pretrain", "finetune"} and all(r["crops_per_s"] > 0 for r in rows)
