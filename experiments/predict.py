"""Segment new scans with a trained run, writing NIfTI segmentations in each scan's own geometry.

    python -m experiments.predict --model=runs/table1/seed0/finetune_contrastive_2 --input=scans/ --output=segs/
    python -m experiments.predict --model=runs/table1/seed0/finetune_contrastive_2/best.msgpack --input=ct.nii.gz \\
        --label=ct_label.nii.gz --output=segs/ --probabilities --figures --dtype=bfloat16
"""

import json
import sys
from pathlib import Path

from absl import flags

from experiments import cli
from jaxseg.errors import UserError, first_line

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "trained run folder (or a weights file in it)", required=True)
flags.DEFINE_string("input", None, "a .nii / .nii.gz scan, or a folder of them", required=True)
flags.DEFINE_string("output", None, "folder for the segmentations", required=True)
flags.DEFINE_bool("probabilities", False, "also write <name>_probs.nii.gz (one channel per class)")
flags.DEFINE_bool("tta", False, "average over the 8 flips of the three axes (test-time augmentation)")
flags.DEFINE_bool("figures", False, "also write <name>.png: a slice with the segmentation overlaid")
flags.DEFINE_string("label", None, "with one --input scan: its label map, drawn as the truth in --figures")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "compute dtype (default: the run's)")
flags.DEFINE_string("compilation_cache", "auto", "persistent XLA compilation cache: 'auto', a folder, or 'off'")
flags.DEFINE_bool("allow_unverified_weights", False, "load a weights file that has no checksum (an older "
                  "jaxseg's); `python -m experiments.accept_weights` gives it one for good")


def main(argv):
    del argv
    from tqdm import tqdm

    from jaxseg.compilation_cache import enable_compilation_cache
    from jaxseg.io import atomic_write_text, check_writable, disk_fault
    from jaxseg.predict import check_outputs, load_model, model_predictor, predict_file

    src = Path(FLAGS.input)
    scans = sorted(p for p in src.iterdir() if p.name.endswith((".nii", ".nii.gz"))) if src.is_dir() else [src]
    if not scans or not all(p.is_file() for p in scans):
        raise UserError(f"{src}: no .nii / .nii.gz scan found")
    if FLAGS.label and len(scans) != 1:
        raise UserError("--label goes with one --input scan, not a folder")
    check_outputs(scans, FLAGS.label, Path(FLAGS.output))
    enable_compilation_cache(FLAGS.compilation_cache)
    model, params, prep = load_model(FLAGS.model, FLAGS.dtype, FLAGS.allow_unverified_weights)
    predict = model_predictor(model, params, prep, flip_tta=FLAGS.tta)  # refuses --tta it cannot honour
    out = check_writable(FLAGS.output)  # nothing is created for a refused run; before any scan is segmented
    results = []
    for path in tqdm(scans, desc="predict", unit="scan"):
        try:
            try:  # one scan that cannot be segmented must not cost the others
                r = {"status": "ok", **predict_file(path, predict, prep, out, FLAGS.probabilities, FLAGS.figures,
                                                    FLAGS.label)}
                print(f"{path.name}: {r['segmentation']} voxels {r['voxels']}", flush=True)
            except UserError as e:
                r = {"input": str(path), "status": "failed", "error": str(e)}
                print(f"{path.name}: FAILED: {e}", file=sys.stderr, flush=True)
            results.append(r)
            atomic_write_text(out / "predictions.json", json.dumps(results, indent=1))  # complete after every scan
        except OSError as e:  # the disk, not the scan: the next ones would fail alike
            fault = disk_fault(e, out)
            if fault is None:
                raise
            raise UserError(f"{out}: {fault} while writing the outputs of {path.name} ({first_line(e, 120)}); "
                            f"the scans before it are listed in {out / 'predictions.json'}") from None
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} scan(s) could not be segmented (see {out / 'predictions.json'}); "
                        f"the other {len(results) - len(failed)} were written")


if __name__ == "__main__":
    cli.run(main)
