"""Segmenting new scans: geometry of an oblique, non-RAS scan, refusals naming the file."""

import nibabel as nib
import numpy as np
import pytest

from jaxseg.data import Task, load_dataset_json, write_phantom_dataset
from jaxseg.data.msd import load_nifti
from jaxseg.data.preprocess import preprocess_case
from jaxseg.errors import UserError
from jaxseg.predict import Preprocessing, predict_file

PREP = Preprocessing(target_spacing=(1.5, 1.5, 1.5), is_ct=True, ct_range=(-175.0, 250.0),
                     task=Task.of(("background", "spleen"), in_channels=1), roi=32)


def _oblique_non_ras(src_img, src_lab, tmp_path):
    """The phantom case re-written as LPS-ordered axes (x and y flipped, axes permuted) under an
    affine rotated 20 degrees about z: same anatomy, another voxel order and world frame."""
    img, aff = load_nifti(src_img)
    lab, _ = load_nifti(src_lab)
    flip = lambda a: np.ascontiguousarray(np.transpose(a[::-1, ::-1], (1, 0, 2)))
    t = np.deg2rad(20)
    rot = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    n0, n1 = img.shape[:2]
    to_old = np.array([[0, -1, 0, n0 - 1], [-1, 0, 0, n1 - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)  # new -> old voxel
    new_aff = rot @ aff @ to_old
    paths = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(flip(img), new_aff), str(paths[0]))
    nib.save(nib.Nifti1Image(flip(lab).astype(np.uint8), new_aff), str(paths[1]))
    return paths


def test_prediction_overlays_the_truth_of_an_oblique_non_ras_scan(tmp_path):
    data = write_phantom_dataset(tmp_path / "d", "spleen", 1, shape=(40, 36, 24), seed=4, workers=1)
    case = load_dataset_json(data).training[0]
    img_path, lab_path = _oblique_non_ras(case.image, case.label, tmp_path)
    image, affine = load_nifti(img_path)
    truth, _ = load_nifti(lab_path)
    ref = preprocess_case(image, affine, truth, target_spacing=PREP.target_spacing, ct=True)

    def oracle(grid_image):  # a perfect model on the model's grid: what remains to test is the geometry
        assert grid_image.shape[:3] == ref["label"].shape
        return np.eye(2, dtype=np.float32)[ref["label"]]

    out = predict_file(img_path, oracle, PREP, tmp_path / "out", probabilities=True, figure=True, label=lab_path)
    seg = nib.load(out["segmentation"])
    assert seg.shape == truth.shape and np.allclose(seg.affine, affine)  # the scan's own grid and world frame
    s, t = np.asarray(seg.dataobj) > 0, truth > 0
    assert 2 * (s & t).sum() / (s.sum() + t.sum()) > 0.9  # overlays the truth voxel by voxel (resampled twice)
    assert nib.load(out["probabilities"]).shape == (*truth.shape, 2) and (tmp_path / "out" / "img.png").is_file()


def test_scans_that_cannot_match_the_model_are_refused_by_name(tmp_path):
    two = tmp_path / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), str(two))
    with pytest.raises(UserError, match=r"two_channels.nii.gz: 2 channel\(s\); the model was trained on 1"):
        predict_file(two, None, PREP, tmp_path)
    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(flat))
    with pytest.raises(UserError, match="slice.nii.gz: a 2-D image"):
        predict_file(flat, None, PREP, tmp_path)
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), str(nan))
    with pytest.raises(UserError, match="nan.nii.gz: contains NaN"):
        predict_file(nan, None, PREP, tmp_path)


def test_figure_draws_the_truth_only_when_a_label_is_given(tmp_path):
    from jaxseg.figures import _overlay_figure

    image = np.random.default_rng(0).random((16, 16, 8, 1)).astype(np.float32)
    truth = np.zeros((16, 16, 8), np.uint8)
    truth[4:9, 4:9, 5] = 1
    pred = np.zeros_like(truth)
    pred[5:10, 5:10, 2] = 1
    with_truth = _overlay_figure(image, truth, pred, False, "x")
    titles = [ax.get_title() for ax in with_truth.axes]
    assert titles == ["image", "ground truth", "prediction"] and "slice 5" in with_truth._suptitle.get_text()
    alone = _overlay_figure(image, None, pred, False, "x")
    assert [ax.get_title() for ax in alone.axes] == ["image", "prediction"] and "slice 2" in alone._suptitle.get_text()


def test_flip_tta_is_refused_for_a_model_not_trained_on_flips():
    import dataclasses

    from jaxseg.predict import check_flip_tta, model_predictor

    for p in (None, 0.1):
        with pytest.raises(UserError, match="predict without --tta"):
            model_predictor(None, None, dataclasses.replace(PREP, train_flip_prob=p), flip_tta=True)
    check_flip_tta(0.5)  # trained to be flip-invariant: allowed


def test_outputs_never_overwrite_an_input_or_each_other(tmp_path):
    from jaxseg.predict import check_outputs

    scans = [tmp_path / "p.nii", tmp_path / "p.nii.gz", tmp_path / "q.nii.gz"]
    with pytest.raises(UserError, match="p.nii and .*p.nii.gz would both be written as .*p.nii.gz"):
        check_outputs(scans, None, tmp_path / "out")
    with pytest.raises(UserError, match="writing q.nii.gz there would overwrite the input"):
        check_outputs(scans[2:], None, tmp_path)  # --output = the input folder
    with pytest.raises(UserError, match="writing q_probs.nii.gz there would overwrite the input"):
        check_outputs(scans[2:], tmp_path / "out" / "q_probs.nii.gz", tmp_path / "out")  # the --label file
    check_outputs(scans[1:], None, tmp_path / "out")  # distinct names, another folder: fine


def test_weights_without_a_checksum_load_only_when_allowed_then_accepted_for_good(tmp_path):
    from flax import serialization

    from jaxseg.io import WeightsError, accept_weights, load_weights, save_weights

    params = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    save_weights(tmp_path / "new.msgpack", params)
    legacy = tmp_path / "old.msgpack"
    legacy.write_bytes(serialization.to_bytes(params))  # an older jaxseg's file: no checksum header
    data = bytearray(legacy.read_bytes())
    data[-1] ^= 0x01  # a flipped bit that nothing can detect
    legacy.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="old.msgpack: a weights file without a checksum .*cannot be verified"):
        load_weights(legacy, params)
    with pytest.warns(UserWarning, match="loaded UNVERIFIED"):
        damaged = load_weights(legacy, params, allow_unverified=True)
    assert not np.array_equal(damaged["params"]["w"], params["params"]["w"])  # why it is refused by default
    assert accept_weights(legacy).endswith("checksum added")
    assert np.array_equal(load_weights(legacy, params)["params"]["w"], damaged["params"]["w"])  # verified now
    assert accept_weights(tmp_path / "new.msgpack").endswith("already carries a checksum (verified)")
