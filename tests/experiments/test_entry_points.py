"""Entry points and benchmark scripts run end to end at a tiny size (smoke tests, no timings asserted).
The model-step, inference and loss-scaling benchmarks run in tests/benchmarks/test_benchmarks.py (run_gpu.sh at toy size)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxseg.config import get_config
from jaxseg.errors import UserError
from jaxseg.predict import load_model
from jaxseg.workflow import run_evaluation, run_finetuning, run_pretraining

pytestmark = pytest.mark.slow  # every test here runs entry points as subprocesses

from tests.runs import ROOT


def run_module(module, *args, timeout=600, rc=0):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_model_summary():
    out = run_module("experiments.model_summary", "--model=tiny", "--img_size=32")
    assert "finite: True" in out and "(1, 32, 32, 32, 2)" in out


def _event_tags(folder):
    """Scalar and image tags in a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars, images = set(), set()
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        while data:
            (n,) = struct.unpack("<Q", data[:8])
            ev = event_pb2.Event.FromString(data[12:12 + n])
            data = data[12 + n + 4:]
            for v in ev.summary.value:
                (images if v.HasField("image") else scalars).add(v.tag)
    return scalars, images


def test_prepare_phantom_and_pipeline_benchmark(tmp_path):
    out = run_module("experiments.prepare", "--write_phantom", "--phantom=braintumour", "--phantom_subjects=2",
                     f"--data_dir={tmp_path / 'data'}", f"--cache_dir={tmp_path / 'cache'}", "--workers=1")
    (folder,) = (tmp_path / "cache").iterdir()  # one folder per preparation, named by its spacing and digest
    assert f"cache at {folder}: " in out and "'done': 2" in out and folder.name.startswith("3x3x3mm-")
    index = json.loads((folder / "cache.json").read_text())
    assert index["regions"] == {"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]} and len(index["training"]) == 2
    path = tmp_path / "pipe.json"
    run_module("benchmarks.pipeline", f"--workdir={tmp_path / 'pipe'}", "--subjects=2", "--crop_size=32",
               "--steps=2", "--warmup=1", "--threads=1", f"--json_out={path}")
    rows = json.loads(path.read_text())["rows"]
    assert {r["pipeline"] for r in rows} == {"pretrain", "finetune"} and all(r["crops_per_s"] > 0 for r in rows)
    assert {r["hosts"] for r in rows} == {1, 2, 4}


def test_scaling_table():
    out = run_module("benchmarks.scaling", "--step_ms=30")
    assert "92,783,842 parameters, 371 MB" in out and "| 64 | 8 |" in out


def test_loop_overhead_benchmark(tmp_path):
    path = tmp_path / "loop.json"
    out = run_module("benchmarks.loop_overhead", "--step_ms=2", "--short=3", "--long=6", "--repeats=1", "--crop=16",
                     f"--json_out={path}")
    med = json.loads(path.read_text())["median"]
    assert "exposed host time" in out and med["device_step_ms"] > 0 and med["loop_step_ms"] > 0


def test_pretrain_finetune_evaluate_entry_points(tmp_path):
    wd = tmp_path / "wd"
    common = ["--config=tiny", f"--workdir={wd}", "--noprogress", "--phantom_subjects=6"]
    out = run_module("experiments.pretrain", *common, "--objective=contrastive", "--stage1_steps=2", "--stage2_steps=2",
                     "--profile_steps=2:2")
    assert "pre-training (contrastive): 4 steps" in out
    for stage in ("encoder", "decoder"):  # --profile_steps: a trace of step 2 of each stage
        assert len(list((wd / "pretrain" / stage / "profile").rglob("*.xplane.pb"))) == 1
    assert "probe, partition of anatomy from enc4 features (chance 0.25): random_init " in out and "-> decoder " in out
    assert (wd / "pretrain" / "params.msgpack").is_file() and (wd / "pretrain" / "pretrain_loss.png").is_file()
    stages = json.loads((wd / "pretrain" / "pretrain_summary.json").read_text())["stages"]
    for st in stages.values():  # every stage against its loss at chance (contrastive, P = 4: ln 4)
        assert abs(st["chance_loss"] - np.log(4)) < 1e-4 and isinstance(st["learned"], bool)
        assert abs(st["loss_vs_chance"] - st["final_mean_loss"] / st["chance_loss"]) < 1e-9
    recs = [json.loads(l) for l in (wd / "pretrain" / "encoder" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all("crops_per_s" in r and "data_wait_s" in r for r in recs)
    md5 = (wd / "pretrain" / "params.msgpack").read_bytes()
    # the same work dir with another objective: refused, old result untouched (not returned under the new name)
    out = run_module("experiments.pretrain", *common, "--objective=comparative", "--stage1_steps=2",
                     "--stage2_steps=2", rc=2)
    assert "objective: 'contrastive' then, 'comparative' now" in out and "Traceback" not in out
    assert (wd / "pretrain" / "params.msgpack").read_bytes() == md5
    out = run_module("experiments.finetune", *common, "--label_budget=100", "--finetune_steps=2", rc=2)
    assert "label_budget 100 exceeds" in out
    out = run_module("experiments.finetune", *common, f"--init={wd / 'pretrain' / 'params.msgpack'}",
                     "--finetune_steps=2", "--eval_every=2", "--label_budget=2")
    assert "best validation Dice" in out
    scalars, images = _event_tags(wd / "finetune" / "tensorboard")
    assert {"loss", "crops_per_s", "val_dice", "learning_rate"} <= scalars and images == {"validation/overlay"}
    # The refusals below run in this process (the entry points call the same functions; how they
    # print a refusal: the subprocess ones above and tests/test_user_errors.py)
    tiny = get_config("tiny", phantom_subjects=6)
    with pytest.raises(UserError, match="init: {.*then, None now"):  # a finished run from another init is not returned
        run_finetuning(tiny.replace(finetune_steps=2, eval_every=2, label_budget=2), wd, progress=False)
    out = run_module("experiments.evaluate", *common, f"--params={wd / 'finetune' / 'best.msgpack'}")
    ev = wd / "eval"
    assert (ev / "cases.csv").is_file() and (ev / "summary.md").is_file() and list((ev / "figures").glob("*.png"))
    split = json.loads((wd / "split.json").read_text())
    import nibabel as nib
    scan = next(wd.glob(f"phantom_spleen*/imagesTr/{split['test'][0]}.nii.gz"))
    out = run_module("experiments.predict", f"--model={wd / 'finetune'}", f"--input={scan}",
                     f"--output={tmp_path / 'pred'}", "--probabilities")
    seg = nib.load(str(tmp_path / "pred" / scan.name))
    assert seg.shape == nib.load(str(scan)).shape[:3] and (tmp_path / "pred" / "predictions.json").is_file()
    out = run_module("experiments.predict", f"--model={wd}", f"--input={scan}", f"--output={tmp_path / 'p2'}", rc=2)
    assert "not a trained run" in out and "Unable to initialize backend" not in out
    _batch_prediction_finishes(wd, scan, tmp_path)
    _damaged_inputs_are_refused_before_any_output(wd, scan, tiny, tmp_path)
    _unverified_weights_load_only_when_allowed(wd, scan, common, tmp_path)
    _predict_never_overwrites_an_input_or_another_output(wd, scan, tmp_path)
    out = run_module("experiments.evaluate", *common, f"--params={wd / 'finetune' / 'best.msgpack'}",
                     "--target_spacing=2", "--out_name=ev_2mm", rc=2)  # a 1 mm model measured at 2 mm: refused
    assert "--target_spacing=2 (the model: (1.0, 1.0, 1.0))" in out and not (wd / "ev_2mm").exists()
    import jaxseg

    model, params, prep = jaxseg.load_model(wd / "finetune")  # one call: model, weights, preprocessing
    assert model.out_channels == 2 and prep.task.in_channels == 1 and prep.task.class_names[1] == "spleen"
    from jaxseg.data import Cache
    from jaxseg.predict import model_predictor

    cache, cid = Cache(_cache_folder(wd)), split["test"][0]  # README's snippet: probabilities, then the task's rule
    probs = model_predictor(model, params, prep)(np.asarray(cache.image(cid)))
    assert probs.shape == (*cache.image(cid).shape[:3], 2) and np.allclose(probs.sum(-1), 1, atol=1e-5)
    mine = nib.load(str(ev / "predictions" / f"{cid}.nii.gz"))  # what experiments.evaluate wrote for the same case
    from jaxseg.data.preprocess import restore_label
    np.testing.assert_array_equal(restore_label(prep.task.segment(probs), cache.meta(cid))[0], np.asarray(mine.dataobj))
    for cid in split["test"]:  # predictions come back in the original image geometry
        pred = nib.load(str(ev / "predictions" / f"{cid}.nii.gz"))
        orig = nib.load(str(next(wd.glob(f"phantom_spleen*/imagesTr/{cid}.nii.gz"))))
        assert pred.shape == orig.shape[:3]
        np.testing.assert_allclose(pred.affine, orig.affine, atol=1e-5)


def _cache_folder(workdir):
    (folder,) = (workdir / "cache").iterdir()  # the job's one preparation
    return folder


def _batch_prediction_finishes(wd, scan, tmp_path):
    """A folder (ok, NaN, ok): the bad scan is reported and skipped, the others written, every
    scan listed with its status, exit non-zero."""
    import nibabel as nib

    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a.nii.gz", "c.nii.gz"):
        (folder / name).write_bytes(scan.read_bytes())
    img = nib.load(str(scan))
    nib.save(nib.Nifti1Image(np.full(img.shape, np.nan, np.float32), img.affine), str(folder / "b.nii.gz"))
    out = run_module("experiments.predict", f"--model={wd / 'finetune'}", f"--input={folder}",
                     f"--output={tmp_path / 'batch'}", rc=2)
    assert "b.nii.gz: FAILED" in out and "1 of 3 scan(s) could not be segmented" in out
    listed = json.loads((tmp_path / "batch" / "predictions.json").read_text())
    assert [(Path(r["input"]).name, r["status"]) for r in listed] == [("a.nii.gz", "ok"), ("b.nii.gz", "failed"),
                                                                      ("c.nii.gz", "ok")]
    assert (tmp_path / "batch" / "a.nii.gz").is_file() and (tmp_path / "batch" / "c.nii.gz").is_file()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder cannot be made under a file, whoever runs the test (root included)
    out = run_module("experiments.predict", f"--model={wd / 'finetune'}", f"--input={folder}",
                     f"--output={blocker / 'out'}", rc=2)
    assert "is not writable" in out and "Traceback" not in out and "voxels" not in out  # before any scan


def _unverified_weights_load_only_when_allowed(wd, scan, common, tmp_path):
    """A weights file without its checksum header (an older jaxseg's, or the header cut off) is
    refused by every job unless allowed; accept_weights gives it one for good (the library side:
    tests/test_predict.py)."""
    from jaxseg.io import read_weights_blob

    old = tmp_path / "old_run"
    old.mkdir()
    (old / "model.json").write_bytes((wd / "finetune" / "model.json").read_bytes())
    (old / "best.msgpack").write_bytes(read_weights_blob(wd / "finetune" / "best.msgpack"))  # flax's bytes alone
    weights = old / "best.msgpack"
    out = run_module("experiments.evaluate", *common, f"--params={weights}", "--out_name=ev_old", rc=2)
    assert f"error: {weights}: a weights file without a checksum" in out and "--allow_unverified_weights" in out
    assert "Traceback" not in out and not (wd / "ev_old").exists()
    assert "checksum added" in run_module("experiments.accept_weights", f"--path={weights}")
    run_module("experiments.predict", f"--model={old}", f"--input={scan}", f"--output={tmp_path / 'po'}")
    assert (tmp_path / "po" / scan.name).is_file()


def _predict_never_overwrites_an_input_or_another_output(wd, scan, tmp_path):
    folder = tmp_path / "own"
    folder.mkdir()
    (folder / scan.name).write_bytes(scan.read_bytes())
    before = (folder / scan.name).read_bytes()
    out = run_module("experiments.predict", f"--model={wd / 'finetune'}", f"--input={folder}", f"--output={folder}",
                     rc=2)
    assert "would overwrite the input" in out and (folder / scan.name).read_bytes() == before
    out = run_module("experiments.predict", f"--model={wd / 'finetune'}", f"--input={scan}", "--tta",
                     f"--output={tmp_path / 'tta_out'}", rc=2)
    assert "--tta" in out and not (tmp_path / "tta_out").exists()  # a refused run creates nothing


def _damaged_inputs_are_refused_before_any_output(wd, scan, tiny, tmp_path):
    bad = tmp_path / "bad_run"
    bad.mkdir()
    for f in ("model.json", "best.msgpack"):
        (bad / f).write_bytes((wd / "finetune" / f).read_bytes())
    data = bytearray((bad / "best.msgpack").read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[len(data) // 2 + 5] ^= 0xFF
    (bad / "best.msgpack").write_bytes(bytes(data))
    weights = bad / "best.msgpack"
    for load, out_name in ((lambda: run_finetuning(tiny, wd, init=weights, out_name="ft_bad", progress=False), "ft_bad"),
                           (lambda: run_evaluation(tiny, wd, weights, "ev_bad", progress=False), "ev_bad"),
                           (lambda: load_model(weights), None)):  # experiments.predict's
        with pytest.raises(UserError, match=f"^{re.escape(str(weights))}: checksum mismatch"):
            load()
        if out_name:
            assert not (wd / out_name).exists()  # no output folder claimed
    # a refused rerun changes nothing: the settings are compared before data is (re)prepared
    index = (_cache_folder(wd) / "cache.json").read_bytes()
    with pytest.raises(UserError, match=r"target_spacing: \[1.0, 1.0, 1.0\] then, \[2.0, 2.0, 2.0\] now"):
        run_pretraining(tiny.replace(objective="contrastive", stage1_steps=2, stage2_steps=2, target_spacing=2), wd,
                        progress=False)
    assert (_cache_folder(wd) / "cache.json").read_bytes() == index and len(list((wd / "cache").iterdir())) == 1


def test_table1_main_job_tiny(table1_one_process, tmp_path):
    out = run_module("experiments.table1", "--config=tiny", f"--workdir={tmp_path / 't1'}", "--objective=contrastive",
                     rc=2)
    assert "use --objectives=contrastive" in out and not (tmp_path / "t1").exists()
    wd, out = table1_one_process  # --seeds=2 --objectives=comparative, tiny (tests/runs.py)
    assert "| none | 2 |" in out and "| comparative | 2 |" in out and "Representation probe" in out
    res = json.loads((wd / "table1.json").read_text())
    assert res["seeds"] == [0, 1] and {r["init"] for r in res["rows"]} == {"none", "comparative"}
    assert {(r["seed"], r["init"]) for r in res["runs"]} == {(s, i) for s in (0, 1) for i in ("none", "comparative")}
    # both seeds score the same test cases (data and split are fixed by data_seed)
    assert len({tuple(sorted(r["cases"])) for r in res["runs"]}) == 1
    comp = next(r for r in res["rows"] if r["init"] == "comparative")
    paired, cases = comp["paired_dice"]["spleen"], len(res["runs"][0]["cases"])
    assert comp["seeds"] == 2 and paired["n"] == 2 * cases and (paired["seeds"], paired["cases"]) == (2, cases)
    assert len(paired["per_seed"]) == 2 and paired["low"] <= paired["mean"] <= paired["high"]
    assert f"over 2 seed(s) × {cases} test case(s)" in (wd / "table1.md").read_text()
    assert {(p["objective"], p["state"]) for p in res["probe"]} == {("comparative", s) for s in ("random_init", "encoder", "decoder")}
    assert all(0 <= p["crop_accuracy"][0] <= 1 for p in res["probe"])
    assert {(c["seed"], c["stage"]) for c in res["convergence"]} == {(s, t) for s in (0, 1) for t in ("encoder", "decoder")}
    assert res["pretraining"]["seed0/comparative"]["train_s"] > 0 and (wd / "pretrain_loss.png").is_file()
    assert (wd / "seed1" / "finetune_comparative_2" / "test" / "summary.json").is_file()
    from benchmarks.sweep_summary import rows  # README's sweep tables come from table1.json this way

    (row,) = rows(wd)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0].startswith("32^3 at 1 mm, T=1.0, stage 2 on probs") and cells[1] == "comparative"
    assert cells[4] == f"{sum(c.get('learned') is False for c in res['convergence'])} of 4"
    assert cells[-1].endswith(f"(2×{cases})")



def _seed_part(result: dict, seed: int, wd: Path, home: Path) -> Path:
    """``wd`` as ``table1 --seed=<seed> --seeds=1`` would leave it, cut from a run over more seeds."""
    (wd / f"seed{seed}").parent.mkdir(parents=True)
    (wd / f"seed{seed}").symlink_to(home / f"seed{seed}")
    part = {"config": {**result["config"], "seed": seed}, "seeds": [seed],
            "runs": [r for r in result["runs"] if r["seed"] == seed],
            "pretraining": {k: v for k, v in result["pretraining"].items() if k.startswith(f"seed{seed}/")}}
    (wd / "table1.json").write_text(json.dumps(part))
    return wd


def test_merge_table1_reports_per_seed_runs_as_one_table1(table1_one_process, table1_two, tmp_path):
    """A table1 per seed, merged: the report of one table1 over those seeds, to the last byte."""
    from jaxseg.table1 import merge_table1

    wd, _ = table1_one_process  # seeds 0 and 1
    whole = json.loads((wd / "table1.json").read_text())
    parts = [_seed_part(whole, s, tmp_path / f"s{s}", wd) for s in (1, 0)]  # in any order
    merged = merge_table1(parts, tmp_path / "merged")
    assert merged["merged_from"] == {"0": str(parts[1]), "1": str(parts[0])}
    again = json.loads((tmp_path / "merged" / "table1.json").read_text())
    assert again.pop("merged_from") == merged["merged_from"]
    assert json.dumps(again, sort_keys=True) == json.dumps(whole, sort_keys=True)
    assert (tmp_path / "merged" / "table1.md").read_text() == (wd / "table1.md").read_text()
    assert (tmp_path / "merged" / "pretrain_loss.png").is_file()

    # Through the entry point, with table1_two: seed 0 run on its own (2 processes) in a work dir of its own.
    out = run_module("experiments.merge_table1", f"--workdir={tmp_path / 'cli'}", str(table1_two), str(parts[0]))
    res = json.loads((tmp_path / "cli" / "table1.json").read_text())
    assert res["seeds"] == [0, 1] and res["merged_from"] == {"0": str(table1_two), "1": str(parts[0])}
    assert {r["seeds"] for r in res["rows"]} == {2} and "over 2 seed(s)" in out
    assert [r["cases"] for r in res["runs"] if r["seed"] == 0] == [r["cases"] for r in json.loads(
        (table1_two / "table1.json").read_text())["runs"]]

    with pytest.raises(UserError, match="seed 0 is in both"):
        merge_table1([wd, table1_two], tmp_path / "m1")
    with pytest.raises(UserError, match=f"seed 0 is in both {parts[1]} and {table1_two}"):  # a merge names its runs
        merge_table1([tmp_path / "merged", table1_two], tmp_path / "m1")
    other = _seed_part({**whole, "config": {**whole["config"], "lr": 0.5}}, 1, tmp_path / "lr", wd)
    with pytest.raises(UserError, match=r"lr 0.5 \(in .*s0: "):
        merge_table1([parts[1], other], tmp_path / "m2")
    runs = [{**r, "cases": dict(list(r["cases"].items())[1:])} for r in whole["runs"]]
    fewer = _seed_part({**whole, "runs": runs}, 1, tmp_path / "fewer", wd)
    with pytest.raises(UserError, match="tested on other cases"):
        merge_table1([parts[1], fewer], tmp_path / "m3")
    with pytest.raises(UserError, match="holds one of the runs"):
        merge_table1(parts, parts[0])
    with pytest.raises(UserError, match=r"missing.table1.json does not exist"):
        merge_table1([parts[0], tmp_path / "missing"], tmp_path / "m4")
    assert not any((tmp_path / m).exists() for m in ("m1", "m2", "m3", "m4"))

def test_pretrain_throughput_convergence(convergence_json):
    """Time to convergence of both objectives (the step rows run in tests/benchmarks/test_benchmarks.py),
    here of the encoder stage alone (--stages; run in the background: tests/conftest.py)."""
    conv = json.loads(convergence_json.read_text())["convergence"]
    assert conv["comparative"]["steps"] == conv["contrastive"]["steps"] == 4 and conv["ratio_contrastive_over_comparative_wall"] > 0
    assert set(conv["comparative"]["stages"]) == set(conv["contrastive"]["stages"]) == {"encoder"}
