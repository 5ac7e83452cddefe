"""Never a stale or silently wrong result: impossible settings refused up front with one line,
outputs that keep the settings that made them, one cache folder per preparation (never changed in place),
concurrent prepares, a full disk named, stale temp folders cleaned."""

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jaxseg.config import get_config, job_settings
from jaxseg.data import Cache, DataValidationError, PrepareConfig, load_dataset_json, prepare, write_phantom_dataset
from jaxseg.data import cache as cache_mod
from jaxseg.data.cache import prepared_cache
from jaxseg.errors import UserError
from jaxseg.run_settings import SETTINGS_FILE, claim_output_dir

from tests.runs import ROOT


@pytest.mark.parametrize("overrides, field", [
    (dict(finetune_steps=-5), "finetune_steps"), (dict(finetune_steps=0), "finetune_steps"),
    (dict(stage1_steps=-1), "stage1_steps"), (dict(stage2_steps=0), "stage2_steps"),
    (dict(ckpt_every=0), "ckpt_every"), (dict(eval_every=0), "eval_every"), (dict(label_budget=-1), "label_budget"),
    (dict(dtype="float16"), "dtype"), (dict(objective="triplet"), "objective"), (dict(target_spacing=-1.0), "target_spacing"),
    (dict(crop_size=40), "crop_size"), (dict(num_partitions=1), "num_partitions"), (dict(data_threads=0), "data_threads"),
    (dict(overlap=1.0), "overlap"), (dict(val_fraction=0.6, test_fraction=0.5), "test_fraction"),
])
def test_impossible_settings_are_refused_naming_the_field(overrides, field):
    with pytest.raises(UserError, match=field):
        get_config("tiny", **overrides)


def test_prepare_settings_are_validated():
    for bad in [(1.0, 1.0), (-1.0, -1.0, -1.0), (1.0, 0.0, 1.0)]:
        with pytest.raises(UserError, match="spacing must be three positive numbers"):
            PrepareConfig(target_spacing=bad)


def test_job_settings_keep_what_the_result_depends_on():
    cfg = get_config("tiny")
    pre, ft = job_settings(cfg, "pretrain"), job_settings(cfg, "finetune")
    assert "objective" in pre and "finetune_steps" not in pre and "data_threads" not in pre
    assert "label_budget" in ft and "objective" not in ft and "lr" in ft and "crop_size" in ft
    assert job_settings(cfg.replace(finetune_steps=7), "pretrain") == pre  # fine-tuning flags leave pre-training alone


def test_output_dir_resumes_only_with_the_same_settings(tmp_path):
    out = tmp_path / "pretrain"
    claim_output_dir(out, {"objective": "comparative", "lr": 1e-4})
    (out / "params.msgpack").write_bytes(b"old")
    assert claim_output_dir(out, {"objective": "comparative", "lr": 1e-4}) == out  # resume
    with pytest.raises(UserError, match=r"objective: 'comparative' then, 'contrastive' now.*--overwrite"):
        claim_output_dir(out, {"objective": "contrastive", "lr": 1e-4})
    assert (out / "params.msgpack").read_bytes() == b"old"  # nothing lost by the refusal
    claim_output_dir(out, {"objective": "contrastive", "lr": 1e-4}, overwrite=True)
    assert not (out / "params.msgpack").exists()
    assert json.loads((out / SETTINGS_FILE).read_text())["objective"] == "contrastive"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "params.msgpack").write_bytes(b"?")
    with pytest.raises(UserError, match="no record of their settings"):
        claim_output_dir(legacy, {"objective": "comparative"})


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_user_errors_print_one_line_and_exit_2(tmp_path):
    proc = _run("experiments.finetune", "--config=tiny", f"--workdir={tmp_path}", "--finetune_steps=-5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: invalid settings: finetune_steps must be >= 1, got -5"
    assert not (tmp_path / "cache").exists()  # refused before any data work
    proc = _run("experiments.finetune", "--config=tiny", f"--workdir={tmp_path}", "--finetune_steps=-5", "--verbose")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = _run("experiments.prepare", f"--data_dir={tmp_path}", f"--cache_dir={tmp_path / 'c'}", "--target_spacing=1,1")
    assert proc.returncode == 2 and "target_spacing must be three positive numbers" in proc.stderr
    proc = _run("experiments.prepare", f"--data_dir={tmp_path}", f"--cache_dir={tmp_path / 'c'}", "--target_spacing=a")
    assert proc.returncode == 2 and "target_spacing must be one or three numbers in mm, got 'a'" in proc.stderr
    proc = _run("experiments.prepare", f"--data_dir={tmp_path / 'none'}", f"--cache_dir={tmp_path / 'c'}")
    assert proc.returncode == 2 and "dataset.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return load_dataset_json(write_phantom_dataset(tmp_path_factory.mktemp("ue") / "data", "spleen", 2,
                                                   shape=(32, 32, 20), seed=2, workers=1))


def test_each_preparation_has_its_own_folder_and_a_complete_one_never_changes(phantom, tmp_path):
    root = tmp_path / "cache"
    coarse = prepared_cache(phantom, root, PrepareConfig(target_spacing=(2.0, 2.0, 2.0)), workers=1, progress=False)
    fine = prepared_cache(phantom, root, PrepareConfig(), workers=1, progress=False)
    assert coarse.name.startswith("2x2x2mm-") and fine.name.startswith("1x1x1mm-")
    assert Cache(coarse).index["target_spacing"] == [2.0, 2.0, 2.0] and Cache(fine).index["target_spacing"] == [1.0] * 3
    c, f = Cache(coarse), Cache(fine)
    assert f.image(f.training[0]).shape[0] > c.image(c.training[0]).shape[0]
    before = {p: p.read_bytes() for p in coarse.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="holds a complete cache prepared with target spacing \\[2.0, 2.0, 2.0\\] mm"):
        prepare(phantom, coarse, PrepareConfig(), workers=1, progress=False)  # never rewritten in place
    assert {p: p.read_bytes() for p in coarse.rglob("*") if p.is_file()} == before
    assert prepare(phantom, fine, PrepareConfig(), workers=1, progress=False)["skipped"] == 2


def test_an_edited_dataset_json_is_checked_again_in_a_folder_of_its_own(phantom, tmp_path):
    """Cases are reused (hard links) only when their files, the settings and the dataset terms
    they depend on are the same; an edited modality re-prepares and re-checks every case."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom.root, data)
    root = tmp_path / "cache"
    first = prepared_cache(load_dataset_json(data), root, workers=1, progress=False)
    meta = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**meta, "name": "renamed"}))
    renamed = prepared_cache(load_dataset_json(data), root, workers=1, progress=False)
    case = Cache(first).training[0]
    assert renamed != first and Cache(renamed).index["name"] == "renamed"
    assert os.path.samefile(first / "cases" / case / "image.npy", renamed / "cases" / case / "image.npy")  # reused
    (data / "dataset.json").write_text(json.dumps({**meta, "modality": {"0": "MRI"}}))
    mri = prepared_cache(load_dataset_json(data), root, workers=1, progress=False)
    assert not Cache(mri).index["is_ct"] and Cache(first).index["is_ct"]  # the first one untouched
    assert not os.path.samefile(first / "cases" / case / "image.npy", mri / "cases" / case / "image.npy")
    assert abs(float(Cache(mri).image(case).mean())) < 0.5 < float(Cache(first).image(case).max())  # z-scored, not windowed
    (data / "dataset.json").write_text(json.dumps({**meta, "labels": {"0": "background"}}))  # spleen (1) removed
    with pytest.raises(DataValidationError, match="label value\\(s\\) \\[1\\] not in dataset.json labels"):
        prepared_cache(load_dataset_json(data), root, workers=1, progress=False)


def test_two_jobs_of_different_spacing_share_a_cache_root_without_touching_each_other(phantom, tmp_path):
    from jaxseg.workflow import ensure_data

    root = tmp_path / "shared"
    results, errors = {}, []

    def job(spacing):
        try:
            cfg = get_config("tiny", data_dir=str(phantom.root), cache_dir=str(root), target_spacing=spacing,
                             val_fraction=0.0, test_fraction=0.0)
            results[spacing] = ensure_data(cfg, tmp_path / f"work{spacing}", progress=False)[0]
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=job, args=(sp,)) for sp in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    one, two = Path(results[1.0].root), Path(results[2.0].root)
    assert one.parent == two.parent == root and one != two
    before = {p: p.read_bytes() for p in one.rglob("*") if p.is_file()}
    again = get_config("tiny", data_dir=str(phantom.root), cache_dir=str(root), target_spacing=2.0,
                       val_fraction=0.0, test_fraction=0.0)
    assert Path(ensure_data(again, tmp_path / "work3", progress=False)[0].root) == two  # found, not redone
    assert {p: p.read_bytes() for p in one.rglob("*") if p.is_file()} == before


def test_concurrent_prepares_into_one_folder(phantom, tmp_path):
    out = tmp_path / "cache"
    (out / "cases").mkdir(parents=True)
    (out / "cases" / ".tmp-case_x-999").mkdir()  # left by a killed run
    results, errors = [], []

    def run():
        try:
            results.append(prepare(phantom, out, workers=1, progress=False))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r["done"] for r in results) == [0, 0, 2]  # one did the work, the others found it done
    assert len(Cache(out).training) == 2 and not list((out / "cases").glob(".tmp-*"))


def test_full_disk_names_the_file_and_leaves_no_temp_folder(phantom, tmp_path, monkeypatch):
    def no_space(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod.np, "save", no_space)
    state, problems = cache_mod._prepare_one(phantom.training[0], phantom, tmp_path, PrepareConfig())
    assert state == "failed" and "image.npy" in problems[0] and "the disk is full" in problems[0]
    assert not list((tmp_path / "cases").glob(".tmp-*"))


def test_dataset_json_entry_errors_name_the_file(tmp_path):
    meta = {"modality": {"0": "CT"}, "labels": {"0": "background", "one": "spleen"},
            "training": [{"label": "./labelsTr/a.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataValidationError) as e:
        load_dataset_json(tmp_path)
    assert all("dataset.json" in p for p in e.value.problems) and len(e.value.problems) == 2
    assert any('no "image"' in p for p in e.value.problems) and any("'one' is not an integer" in p for p in e.value.problems)


def test_prepare_of_an_unchanged_dataset_does_nothing_and_jobs_reuse_its_cache(phantom, tmp_path, monkeypatch):
    from jaxseg.workflow import ensure_data

    root = tmp_path / "shared_cache"
    out = prepared_cache(phantom, root, PrepareConfig(), workers=1, progress=False)
    index = (out / "cache.json").stat().st_mtime_ns

    def no_case(*a, **k):
        raise AssertionError("an unchanged dataset was prepared again")

    monkeypatch.setattr(cache_mod, "_prepare_one", no_case)
    assert prepare(phantom, out, PrepareConfig(), workers=1, progress=False) == {"done": 0, "skipped": 2, "failed": 0}
    cfg = get_config("tiny", data_dir=str(phantom.root), cache_dir=str(root), val_fraction=0.0, test_fraction=0.0)
    cache, split = ensure_data(cfg, tmp_path / "work", progress=False)
    assert Path(cache.root) == out and not (tmp_path / "work" / "cache").exists()  # one cache
    assert (out / "cache.json").stat().st_mtime_ns == index and len(split["train"]) == 2
    assert "cache_dir" not in job_settings(cfg, "pretrain")  # where the cache lives changes no result