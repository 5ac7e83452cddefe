"""Entry points and benchmark scripts run end to end at a tiny size (smoke tests, no timings asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

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


def test_pretrain_finetune_evaluate_entry_points(tmp_path):
    wd = tmp_path / "wd"
    common = ["--config=tiny", f"--workdir={wd}", "--noprogress", "--phantom_subjects=6"]
    out = run_module("experiments.pretrain", *common, "--objective=contrastive", "--stage1_steps=2", "--stage2_steps=2")
    assert "pre-training (contrastive): 4 steps" in out
    assert (wd / "pretrain" / "params.msgpack").is_file() and (wd / "pretrain" / "pretrain_loss.png").is_file()
    recs = [json.loads(l) for l in (wd / "pretrain" / "feat" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all("crops_per_s" in r and "data_wait_s" in r for r in recs)
    out = run_module("experiments.finetune", *common, f"--init={wd / 'pretrain' / 'params.msgpack'}",
                     "--finetune_steps=2", "--eval_every=2", "--label_budget=2")
    assert "best validation Dice" in out
    out = run_module("experiments.evaluate", *common, f"--params={wd / 'finetune' / 'best.msgpack'}")
    ev = wd / "eval"
    assert (ev / "cases.csv").is_file() and (ev / "summary.md").is_file() and list((ev / "figures").glob("*.png"))
    split = json.loads((wd / "split.json").read_text())
    import nibabel as nib
    for cid in split["test"]:  # predictions come back in the original image geometry
        pred = nib.load(str(ev / "predictions" / f"{cid}.nii.gz"))
        orig = nib.load(str(wd / "phantom_spleen" / "imagesTr" / f"{cid}.nii.gz"))
        assert pred.shape == orig.shape[:3]
        np.testing.assert_allclose(pred.affine, orig.affine, atol=1e-5)


def test_table1_main_job_tiny(tmp_path):
    wd = tmp_path / "t1"
    out = run_module("experiments.table1", "--config=tiny", f"--workdir={wd}", "--noprogress",
                     "--objectives=comparative", "--budgets=2", "--stage1_steps=2", "--stage2_steps=2",
                     "--finetune_steps=2", "--eval_every=2", "--phantom_subjects=6")
    assert "| none | 2 |" in out and "| comparative | 2 |" in out
    res = json.loads((wd / "table1.json").read_text())
    assert {r["init"] for r in res["rows"]} == {"none", "comparative"}
    assert res["pretraining"]["comparative"]["train_s"] > 0 and (wd / "pretrain_loss.png").is_file()


def test_pretrain_throughput_and_inference_benchmarks(tmp_path):
    path = tmp_path / "pt.json"
    out = run_module("benchmarks.pretrain_throughput", "--preset=tiny", "--crop_size=32", "--steps=2", "--warmup=0",
                     "--objectives=comparative,comparative_sampled,contrastive", "--stages=feat",
                     f"--work_dir={tmp_path / 'w'}", f"--json_out={path}")
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 6 and all(r["median_s"] > 0 and r["compile_s"] > 0 for r in rows)
    path = tmp_path / "conv.json"
    run_module("benchmarks.pretrain_throughput", "--mode=convergence", "--preset=tiny", "--max_steps=14",
               f"--work_dir={tmp_path / 'w'}", f"--json_out={path}")
    conv = json.loads(path.read_text())["convergence"]
    assert conv["comparative"]["steps"] >= 2 and conv["ratio_contrastive_over_comparative_wall"] > 0
    path = tmp_path / "inf.json"
    run_module("benchmarks.inference", "--preset=tiny", "--roi=32", "--cases=a:40x36x33x2x3", "--repeats=1",
               "--against=none", f"--json_out={path}")
    assert json.loads(path.read_text())["rows"][0]["median_s"] > 0
