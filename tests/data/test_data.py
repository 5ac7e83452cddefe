"""Data: NIfTI I/O, RAS, resampling, BraTS mapping, validation errors, cache, phantoms, pipelines."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from jaxseg.errors import UserError

from jaxseg.config import Config
from jaxseg.data import (Cache, DataValidationError, finetune_dataset,
                         labelled_subset, load_dataset_json, make_iterator, prepare, pretrain_dataset, split_cases,
                         write_phantom_dataset)
from jaxseg.data import cache as cache_mod
from jaxseg.data import workers as workers_mod
from jaxseg.data.msd import load_nifti
from jaxseg.data.preprocess import (brats_regions, label_channels, preprocess_case, resample, restore_label,
                                    save_nifti, to_ras)

LPS = np.diag([-1.2, -1.2, 2.0, 1.0])
LPS[:3, 3] = [30.0, 40.0, -10.0]


def world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


def test_nifti_round_trip_keeps_affine(tmp_path):
    data = np.random.default_rng(0).standard_normal((5, 6, 7, 2)).astype(np.float32)
    save_nifti(tmp_path / "x.nii.gz", data, LPS)
    back, aff = load_nifti(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(aff, LPS)


def test_to_ras_reorients_and_keeps_world_positions():
    data = np.zeros((6, 7, 8), np.float32)
    data[1, 2, 3] = 1
    out, aff, _ = to_ras(data, LPS)
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    ijk = np.argwhere(out == 1)[0]
    np.testing.assert_allclose(world(aff, ijk), world(LPS, (1, 2, 3)))


def test_resampling_puts_structure_at_right_physical_place():
    data = np.zeros((40, 40, 20), np.float32)
    data[10:14, 25:29, 5:8] = 1.0  # a block; its centroid must keep its world position
    centroid_world = world(LPS, np.argwhere(data > 0).mean(0))
    out = preprocess_case(data, LPS, (data > 0).astype(np.uint8), target_spacing=(1.0, 1.0, 1.0))
    meta = out["meta"]
    lab = out["label"]
    box = np.array(meta["crop_box"])[:, 0]
    got = world(np.asarray(meta["resampled_affine"]), np.argwhere(lab > 0).mean(0) + box)
    np.testing.assert_allclose(got, centroid_world, atol=0.6)  # within a target voxel
    np.testing.assert_allclose(np.sqrt((np.asarray(meta["resampled_affine"])[:3, :3] ** 2).sum(0)), 1.0)
    assert lab.sum() == pytest.approx(4 * 4 * 3 * 1.2 * 1.2 * 2.0, rel=0.35)
    img, aff = resample(data, LPS, (1.2, 1.2, 2.0), order=1)  # same spacing: unchanged
    np.testing.assert_array_equal(img, data)


def test_prediction_maps_back_to_original_geometry():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (40, 40, 20)).astype(np.float32)
    label = np.zeros((40, 40, 20), np.uint8)
    label[8:30, 10:25, 4:15] = 1
    out = preprocess_case(image, LPS, label, target_spacing=(1.0, 1.0, 1.0))
    back, aff = restore_label(out["label"], out["meta"])  # "predict" the cached label itself
    assert back.shape == label.shape
    np.testing.assert_allclose(aff, LPS)
    assert np.mean(back == label) > 0.99
    same = preprocess_case(image, LPS, label, target_spacing=(1.2, 1.2, 2.0))  # RAS flip only
    np.testing.assert_array_equal(restore_label(same["label"], same["meta"])[0], label)


def test_brats_mapping_from_names_not_numbers():
    msd = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
    assert brats_regions(msd) == {"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]}
    other = {0: "background", 1: "necrotic core", 2: "peritumoral edema", 4: "GD-enhancing tumor"}
    assert brats_regions(other) == {"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]}
    ch = label_channels(np.array([0, 1, 2, 3]), brats_regions(msd))
    np.testing.assert_array_equal(ch, [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="not a BraTS"):
        brats_regions({0: "background", 1: "spleen"})


def test_task_decides_and_measures_classes_and_regions_one_way(spleen_cache):
    """One decision rule: argmax over softmax classes; p > 0.5 per (overlapping) region. Its
    foreground masks and its model.json record agree with that."""
    from jaxseg.data import Task

    classes = spleen_cache.task
    assert classes == Task.of(("background", "spleen"), 1) and not classes.multilabel and classes.num_classes == 2
    probs = np.array([[0.7, 0.3], [0.4, 0.6]], np.float32)
    np.testing.assert_array_equal(classes.segment(probs), [0, 1])
    (name, p, t), = classes.foreground(np.array([0, 1]), np.array([1, 1]))
    assert name == "spleen" and p.tolist() == [False, True] and t.tolist() == [True, True]
    regions = Task.of(("TC", "WT", "ET"), 4, brats_regions({0: "background", 1: "edema", 2: "non-enhancing", 3: "enhancing"}))
    assert regions.multilabel and regions.num_classes == 3
    np.testing.assert_array_equal(regions.segment(np.array([[0.6, 0.9, 0.2]])), [[1, 1, 0]])  # regions overlap
    np.testing.assert_array_equal(regions.targets(np.array([3])), [[1, 1, 1]])
    assert [n for n, _, _ in regions.foreground(np.zeros((1, 3), np.uint8), np.array([0]))] == ["TC", "WT", "ET"]
    for task in (classes, regions):
        assert Task.from_card(task.card()) == task and hash(task) == hash(Task.from_card(task.card()))
    old = Task.from_card({k: v for k, v in regions.card().items() if k != "regions"})  # an older model.json
    assert old.multilabel and old.class_names == ("TC", "WT", "ET")
    np.testing.assert_array_equal(old.segment(np.array([[0.6, 0.9, 0.2]])), [[1, 1, 0]])  # it still predicts
    with pytest.raises(ValueError, match="does not record which label values"):
        old.targets(np.array([3]))  # but cannot say what a label map means, rather than compare against nothing
    logits = np.array([[2.0, -1.0, 0.0]], np.float32)
    np.testing.assert_allclose(np.asarray(regions.probabilities(logits)), 1 / (1 + np.exp(-logits)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(classes.probabilities(logits)).sum(-1), 1.0, rtol=1e-6)


def test_every_validation_problem_is_reported_with_its_file(tmp_path, spleen_dir):
    root = tmp_path / "broken"
    shutil.copytree(spleen_dir, root)
    info = load_dataset_json(root)
    c = {case.case_id: case for case in info.training}
    os.remove(c["spleen_000"].image)  # missing file
    c["spleen_001"].image.write_bytes(b"\x1f\x8b not really a nifti")  # corrupt
    img, aff = load_nifti(c["spleen_002"].image)
    save_nifti(c["spleen_002"].label, np.zeros(img.shape[:2] + (img.shape[2] - 1,), np.uint8), aff)  # shape
    lab, _ = load_nifti(c["spleen_003"].label)
    save_nifti(c["spleen_003"].label, lab.astype(np.uint8), aff * 1.5)  # affine mismatch
    bad = img.copy(); bad[0, 0, 0] = np.nan
    save_nifti(c["spleen_004"].image, np.stack([bad, bad], -1), aff)  # NaN + 2 channels vs 1 modality
    lab5, aff5 = load_nifti(c["spleen_005"].label)
    lab5[0, 0, 0] = 7
    save_nifti(c["spleen_005"].label, lab5.astype(np.uint8), aff5)  # unknown label value
    with pytest.raises(DataValidationError) as err:  # every problem at once, each naming its file
        prepare(info, tmp_path / "cache", progress=False, workers=1)
    problems = err.value.problems
    expect = {
        "spleen_000": "missing file", "spleen_001": "corrupt", "spleen_002": "label shape",
        "spleen_003": "affine differs", "spleen_004": "NaN", "spleen_005": "not in dataset.json labels",
    }
    for case_id, what in expect.items():
        assert any(case_id in p and what in p for p in problems), (case_id, what, problems)
    assert any("spleen_004" in p and "2 channel(s)" in p for p in problems)
    lab, aff = load_nifti(c["spleen_005"].label)
    save_nifti(c["spleen_005"].label, np.zeros_like(lab, np.uint8), aff)
    with pytest.raises(DataValidationError, match="spleen_005.*empty label"):
        prepare(info, tmp_path / "cache", progress=False, workers=1)  # the valid cases stay cached


@pytest.mark.parametrize("meta, problem", [
    (None, "must be a JSON object"),
    ([1, 2], "must be a JSON object"),
    ({"modality": {"0": "CT"}, "labels": {"0": "bg"}, "training": {"image": "a"}}, '"training" must be a list'),
    ({"modality": None, "labels": {"0": "bg"}, "training": []}, '"modality" must be a non-empty object'),
    ({"modality": {"0": "CT"}, "labels": ["bg"], "training": []}, '"labels" must be a non-empty object'),
    ({"modality": {"0": 7}, "labels": {"0": "bg"}, "training": []}, "the name must be a string"),
    ({"modality": {"0": "CT"}, "labels": {"0": "bg"}, "training": [], "test": [{"image": "t.nii.gz"}]},
     '"test" must be a list of image paths'),
    ({"modality": {"0": "CT"}, "labels": {"0": "bg"}, "training": [{"image": "a.nii.gz", "label": 3}]},
     '"label" must be a path'),
])
def test_every_dataset_json_problem_is_named_in_one_line(tmp_path, meta, problem):
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataValidationError) as e:
        load_dataset_json(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'dataset.json'}: ") and problem in str(e.value)
    assert "\n" not in str(e.value)


def test_a_non_integer_label_value_is_refused_naming_the_file(spleen_dir, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(spleen_dir, root)
    info = load_dataset_json(root)
    case = info.training[0]
    lab, aff = load_nifti(case.label)
    lab[lab == 1] = 1.5  # what a label map resampled with interpolation holds
    save_nifti(case.label, lab.astype(np.float32), aff)
    with pytest.raises(DataValidationError, match=f"{case.label}: non-integer label value\\(s\\) \\[1.5\\]"):
        prepare(info, tmp_path / "cache", progress=False, workers=1)


def test_missing_dataset_json(tmp_path):
    with pytest.raises(UserError, match="dataset.json"):
        load_dataset_json(tmp_path)


def test_cache_contents_and_skip(spleen_dir, spleen_cache):
    assert len(spleen_cache.training) == 6 and spleen_cache.task.num_classes == 2
    img = spleen_cache.image(spleen_cache.training[0])
    assert img.ndim == 4 and img.shape[-1] == 1 and img.dtype == np.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0  # CT window scaled to [0, 1]
    status = prepare(load_dataset_json(spleen_dir), spleen_cache.root, progress=False, workers=1)
    assert status == {"done": 0, "skipped": 6, "failed": 0}


@pytest.fixture
def pools(monkeypatch):
    """The worker pools started (their positional arguments: the worker count)."""
    started = []

    class CountingPool(workers_mod.cf.ProcessPoolExecutor):
        def __init__(self, *a, **kw):
            started.append(a)
            super().__init__(*a, **kw)

    monkeypatch.setattr(workers_mod.cf, "ProcessPoolExecutor", CountingPool)
    return started


def test_quick_cases_are_prepared_here_slow_ones_in_worker_processes(spleen_dir, spleen_cache, tmp_path, monkeypatch,
                                                                      pools):
    """The first case always runs in this process; the rest go to a pool once it pays
    (POOL_START_S). Both ways cache the same arrays."""
    info = load_dataset_json(spleen_dir)
    monkeypatch.setattr(workers_mod, "POOL_START_S", -1.0)  # workers start at once: one here, five in 2 workers
    assert prepare(info, tmp_path / "a" / "pooled", progress=False, workers=2)["done"] == 6 and pools == [(2,)]
    monkeypatch.setattr(workers_mod, "POOL_START_S", 1e9)
    assert prepare(info, tmp_path / "b" / "here", progress=False, workers=2)["done"] == 6 and len(pools) == 1
    for cid in spleen_cache.training:
        for folder in ("pooled", "here"):
            got = Cache(next(tmp_path.glob(f"*/{folder}")))
            np.testing.assert_array_equal(got.image(cid), spleen_cache.image(cid))
            np.testing.assert_array_equal(got.label(cid), spleen_cache.label(cid))


def test_worker_processes_start_only_when_they_finish_sooner():
    pays = workers_mod.pays_to_pool  # 3 s to start, then the rest shared between the workers
    assert pays(7.0, 2) and not pays(5.0, 2) and pays(5.0, 4)
    assert not pays(1e6, 1)  # one worker only adds its start


def test_cache_resumes_after_a_kill(spleen_dir, tmp_path, monkeypatch):
    info = load_dataset_json(spleen_dir)
    out = tmp_path / "cache"
    real_save = np.save
    calls = {"n": 0}

    def dying_save(path, arr):  # the process dies while writing the 3rd case's label (image, label, crop rows each)
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("killed")
        real_save(path, arr)

    monkeypatch.setattr(cache_mod.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        for case in info.training:
            cache_mod._prepare_one(case, info, out, cache_mod.PrepareConfig())
    monkeypatch.setattr(cache_mod.np, "save", real_save)
    third = cache_mod.case_dir(out, info.training[2].case_id)
    assert not third.exists() and not cache_mod.is_complete(third)  # nothing half-written looks done
    assert cache_mod.is_complete(cache_mod.case_dir(out, info.training[1].case_id))
    status = prepare(info, out, progress=False, workers=1)
    assert status == {"done": 4, "skipped": 2, "failed": 0}


def test_phantom_is_deterministic(tmp_path, monkeypatch, pools):
    a = write_phantom_dataset(tmp_path / "a", "braintumour", 3, seed=5, workers=1)
    c = write_phantom_dataset(tmp_path / "c", "braintumour", 2, seed=6, workers=1)
    monkeypatch.setattr(workers_mod, "POOL_START_S", -1.0)  # the first subject here, two in 2 workers
    b = write_phantom_dataset(tmp_path / "b", "braintumour", 3, seed=5, workers=2)
    assert pools == [(2,)]
    for sub in ("imagesTr/BRATS_001.nii.gz", "labelsTr/BRATS_001.nii.gz", "imagesTr/BRATS_002.nii.gz"):
        np.testing.assert_array_equal(load_nifti(a / sub)[0], load_nifti(b / sub)[0])
    assert not np.array_equal(load_nifti(a / "imagesTr/BRATS_001.nii.gz")[0], load_nifti(c / "imagesTr/BRATS_001.nii.gz")[0])
    meta = json.loads((a / "dataset.json").read_text())
    assert meta["labels"]["3"] == "enhancing tumour" and len(meta["modality"]) == 4
    lab = load_nifti(a / "labelsTr/BRATS_000.nii.gz")[0]
    assert set(np.unique(lab)) == {0, 1, 2, 3}  # nested regions all present


@pytest.mark.parametrize("kind", ["spleen", "braintumour"])
def test_phantom_same_partition_slices_are_more_similar(tmp_path, kind):
    root = write_phantom_dataset(tmp_path / kind, kind, 4, seed=1)
    prepare(load_dataset_json(root), tmp_path / "cache", progress=False, workers=2)
    c = Cache(tmp_path / "cache")
    vols = [np.asarray(c.image(i)) for i in c.training]
    p = 4
    same, other = [], []
    for axis in range(3):
        length = min(v.shape[axis] for v in vols)
        idx = [int((q + 0.5) * length / p) for q in range(p)]

        def sl(v, q):
            s = np.take(v, idx[q], axis=axis)[..., 0]
            t = np.zeros((100, 100), np.float32)  # compare slices on a common canvas
            t[: s.shape[0], : s.shape[1]] = s[:100, :100]
            return t.ravel() / (np.linalg.norm(t) + 1e-6)

        for a in range(len(vols)):
            for b in range(len(vols)):
                if a != b:
                    for q in range(p):
                        same.append(sl(vols[a], q) @ sl(vols[b], q))
                        other += [sl(vols[a], q) @ sl(vols[b], r) for r in range(p) if r != q]
    assert np.mean(same) > np.mean(other) + 0.02, (np.mean(same), np.mean(other))


def test_pretrain_pipeline_shapes_determinism_and_resume(spleen_cache):
    cfg = Config().replace(crop_size=32)
    ds = pretrain_dataset(spleen_cache, spleen_cache.training, cfg, seed=7)
    e = ds[3]
    assert e["image"].shape == (4, 32, 32, 32, 1) and e["offset_u"].shape == (3, 4)
    assert (e["offset_u"] == e["offset_u"][:, :1]).all()  # shared offset by default
    assert "triplets" not in e  # only a sampled objective's pipeline draws them
    again = pretrain_dataset(spleen_cache, spleen_cache.training, cfg, seed=7)[3]
    np.testing.assert_array_equal(again["image"], e["image"])
    sampled = pretrain_dataset(spleen_cache, spleen_cache.training, cfg.replace(objective="comparative_sampled", sampled_triplets=8),
                               seed=7)
    t = sampled[3]["triplets"]
    assert t.shape == (3, 8, 4) and t.dtype == np.int32 and (t[..., 0] != t[..., 1]).all() and (t[..., 2] != t[..., 3]).all()
    np.testing.assert_array_equal(sampled[3]["triplets"], t)  # a function of (seed, step)
    assert not np.array_equal(sampled[4]["triplets"], t)
    np.testing.assert_array_equal(sampled[3]["image"], e["image"])  # the crops do not depend on it
    it1 = make_iterator(ds, num_threads=1)
    first = [next(it1) for _ in range(3)]
    state = it1.get_state()
    rest = [next(it1)["image"] for _ in range(2)]
    it2 = make_iterator(pretrain_dataset(spleen_cache, spleen_cache.training, cfg, seed=7), num_threads=3)
    it2.set_state(state)
    for want in rest:
        np.testing.assert_array_equal(next(it2)["image"], want)  # thread count does not matter
    np.testing.assert_array_equal(first[0]["image"], ds[0]["image"])


def test_finetune_pipeline_balanced_crops_and_epochs(spleen_cache):
    ids = spleen_cache.training[:3]
    cfg = Config().replace(crop_size=16, finetune_crops_per_volume=4, finetune_flip_prob=0, finetune_rot90_prob=0)
    ds = finetune_dataset(spleen_cache, ids, cfg, seed=1)
    e = ds[0]
    assert e["image"].shape == (4, 16, 16, 16, 1) and e["label"].shape == (4, 16, 16, 16)
    has_fg = np.mean([(lab > 0).any() for k in range(20) for lab in ds[k]["label"]])
    assert has_fg >= 0.5  # at least the positive half of the crops holds foreground
    pos_only = finetune_dataset(spleen_cache, ids, cfg.replace(pos_fraction=1.0), seed=1)
    assert all((lab > 0).any() for k in range(10) for lab in pos_only[k]["label"])
    it = make_iterator(ds, num_threads=2)
    s0 = [next(it)["image"] for _ in range(2)]
    st = it.get_state()
    nxt = next(it)["image"]
    it2 = make_iterator(finetune_dataset(spleen_cache, ids, cfg, seed=1), num_threads=1)
    it2.set_state(st)
    np.testing.assert_array_equal(next(it2)["image"], nxt)
    assert s0[0].shape == nxt.shape
    order = [int(ds[k]["volume"][0]) for k in range(6)]  # 3 cases, 1 volume per step
    assert sorted(order[:3]) == [0, 1, 2] and sorted(order[3:]) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_per_host_rows_concatenate_to_the_single_process_batch(spleen_cache, kind):
    """Each of M hosts makes only its own rows of step k's global batch, and the rows of hosts
    0..M-1 concatenated are the batch one process makes; per-step arrays are the same everywhere."""
    if kind == "pretrain":
        cfg = Config().replace(crop_size=16, volumes_per_step=2, crops_per_volume=2)
        make = lambda shard: pretrain_dataset(spleen_cache, spleen_cache.training, cfg, seed=5, shard=shard)
    else:
        cfg = Config().replace(crop_size=16, finetune_volumes_per_step=2, finetune_crops_per_volume=2)
        make = lambda shard: finetune_dataset(spleen_cache, spleen_cache.training, cfg, seed=5, shard=shard)
    whole = make((0, 1))
    for m in (2, 4):
        hosts = [make((i, m)) for i in range(m)]
        for k in (0, 3):
            parts = [h[k] for h in hosts]
            for key, want in whole[k].items():
                if key in ("image", "label"):
                    assert all(len(p[key]) == len(want) // m for p in parts)
                    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want, err_msg=key)
                else:
                    for p in parts:
                        np.testing.assert_array_equal(p[key], want, err_msg=key)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        make((0, 3))


def test_splits_and_labelled_subset():
    ids = [f"c{i:02d}" for i in range(20)]
    s = split_cases(ids, 0.2, 0.2, seed=0)
    assert len(s["test"]) == 4 and len(s["val"]) == 4 and len(s["train"]) == 12
    assert not set(s["test"]) & set(s["train"]) and not set(s["val"]) & set(s["train"])
    assert split_cases(ids, 0.2, 0.2, seed=0) == s
    b2, b5 = labelled_subset(s["train"], 2, seed=0), labelled_subset(s["train"], 5, seed=0)
    assert b5[:2] == b2 and len(labelled_subset(s["train"], None, seed=0)) == 12


def test_duplicate_case_ids_are_refused_naming_dataset_json(tmp_path):
    meta = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
            "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
                         {"image": "./other/a.nii.gz", "label": "./labelsTr/a2.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataValidationError, match=r"dataset.json: duplicate case ids \['a'\]"):
        load_dataset_json(tmp_path)


def test_pretraining_augmentation_modes(spleen_cache, monkeypatch):
    """per_crop keeps the stream of before (each crop its own draws, as the authors'); per_step
    gives every crop of a step the same flips and rotation, so partition p is the same anatomy in
    all of them; none flips and rotates nothing. Intensity shifts stay per crop."""
    from jaxseg.data import augment as aug
    from jaxseg.data import pipelines

    cfg = Config().replace(crop_size=16, pretrain_flip_prob=0.5, pretrain_rot90_prob=0.5)
    seen = []
    real_apply = aug.apply
    monkeypatch.setattr(pipelines, "apply", lambda t, *a: (seen.append(t), real_apply(t, *a))[1])
    per_step = []
    for mode in ("per_crop", "per_step", "none"):
        ds = pretrain_dataset(spleen_cache, spleen_cache.training, cfg.replace(pretrain_augment=mode), seed=3)
        seen.clear()
        for k in range(12):
            ds[k]
        steps = [seen[i:i + 4] for i in range(0, len(seen), 4)]  # 2 volumes x 2 crops per step
        spatial = [{(t.flips, t.quarter_turns) for t in s} for s in steps]
        if mode == "per_crop":
            assert any(len(s) > 1 for s in spatial)
            e = ds[3]  # the stream of before: crop, then augment(rng, ...) per row, in this order
            step = np.random.default_rng([3, 3])
            chosen = step.choice(len(spleen_cache.training), size=2, replace=False)
            for r in range(4):
                rng = np.random.default_rng([3, 3, 1 + r])
                img = spleen_cache.image(spleen_cache.training[chosen[r // 2]])
                c = aug.crop_at(img, aug.random_start(rng, img.shape[:3], (16,) * 3), (16,) * 3)
                want = aug.augment(rng, c, flip_prob=0.5, rot90_prob=0.5, shift_prob=0.5)[0]
                np.testing.assert_array_equal(e["image"][r], want)
        elif mode == "per_step":
            assert all(len(s) == 1 for s in spatial) and len({frozenset(s) for s in spatial}) > 1
            per_step = steps
        else:
            assert spatial == [{((False, False, False), 0)}] * 12
    assert len({t.offset for s in per_step for t in s}) > 1  # shifts still drawn per crop


def test_crop_rows_are_stored_when_prepared_and_an_older_cache_gains_them_on_first_use(spleen_cache, tmp_path,
                                                                                       monkeypatch):
    """A fine-tuning pipeline reads each case's crop rows from the cache instead of scanning its
    volume; a cache prepared without them (an older jaxseg) gets them written beside its arrays
    the first time, and the same crops either way."""
    from jaxseg.data.pipelines import CropCentres

    cid = spleen_cache.training[0]
    stored = np.load(cache_mod.case_dir(spleen_cache.root, cid) / cache_mod.CROP_ROWS)
    image, label = spleen_cache.image(cid), spleen_cache.label(cid)
    np.testing.assert_array_equal(stored, cache_mod.crop_rows(image, label))
    old = tmp_path / "old"
    shutil.copytree(spleen_cache.root, old)
    for f in old.glob(f"cases/*/{cache_mod.CROP_ROWS}"):
        f.unlink()
    cfg = Config().replace(crop_size=16, finetune_steps=3)
    scans, real = [], cache_mod.crop_rows
    monkeypatch.setattr(cache_mod, "crop_rows", lambda *a: scans.append(1) or real(*a))

    def labels(cache):
        ds = finetune_dataset(cache, cache.training, cfg, seed=1)
        return [ds[k]["label"] for k in range(3)]

    first = labels(Cache(old))
    written = [c for c in Cache(old).training if (old / "cases" / c / cache_mod.CROP_ROWS).is_file()]
    assert scans and len(written) == len(scans)  # each volume used: scanned once, its rows written
    n = len(scans)
    again, fresh = labels(Cache(old)), labels(spleen_cache)
    assert len(scans) == n  # read back, not scanned again
    for a, b, c in zip(first, again, fresh):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    where = CropCentres(image, label, stored)
    assert (where.num_fg, where.num_bg) == (int((label > 0).sum()), int(stored[1, -1]))


def test_crop_rows_cut_short_are_made_again_and_a_read_only_cache_computes_them(spleen_cache, tmp_path, monkeypatch):
    import errno
    import pathlib

    root = tmp_path / "c"
    shutil.copytree(spleen_cache.root, root)
    cid = spleen_cache.training[0]
    path = root / "cases" / cid / cache_mod.CROP_ROWS
    want = cache_mod.crop_rows(spleen_cache.image(cid), spleen_cache.label(cid))
    path.write_bytes(b"")  # renamed into place, then the machine lost power before the data reached the disk
    np.testing.assert_array_equal(Cache(root).crop_rows(cid), want)
    np.testing.assert_array_equal(np.load(path), want)  # written again
    path.unlink()

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_mod, "open", read_only, raising=False)
    monkeypatch.setattr(pathlib.Path, "unlink", read_only)  # a read-only mount refuses even a missing file's unlink
    np.testing.assert_array_equal(Cache(root).crop_rows(cid), want)
    assert not path.exists()


@pytest.mark.parametrize("case", ["mixed", "no_foreground", "no_background"])
def test_crop_centres_are_the_voxels_the_masks_give_in_c_order(case):
    """Fine-tuning crop centres found once per volume (jaxseg.data.pipelines.CropCentres): the
    i-th foreground / background voxel is the i-th of np.argwhere over the full masks, as the
    per-step scan it replaces picked them, so a seed gives the same crops."""
    from jaxseg.data.pipelines import CropCentres

    rng = np.random.default_rng(5)
    image = rng.normal(size=(7, 5, 6, 2)).astype(np.float32)
    image[:, :2] = 0  # outside the body: never a background centre
    label = (rng.random((7, 5, 6)) < 0.2).astype(np.uint8) * rng.integers(1, 3, (7, 5, 6)).astype(np.uint8)
    if case == "no_foreground":
        label[:] = 0
    if case == "no_background":
        label[:] = 1
    where = CropCentres(image, label)
    fg = np.argwhere(label > 0)
    bg = np.argwhere((label == 0) & np.any(image != 0, axis=-1))
    assert (where.num_fg, where.num_bg) == (len(fg), len(bg))
    for i in range(len(fg)):
        assert where.foreground(i) == tuple(fg[i])
    for i in range(len(bg)):
        assert where.background(i) == tuple(bg[i])
