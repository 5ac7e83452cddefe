"""Segment new scans with a trained run, writing NIfTI segmentations in each scan's own geometry.

    python -m experiments.predict --model=runs/spleen/finetune --input=scans/ --output=segs/
    python -m experiments.predict --model=runs/spleen/finetune/best.msgpack --input=ct.nii.gz \\
        --output=segs/ --probabilities --tta --figures --dtype=bfloat16
"""

import json
from pathlib import Path

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "trained run folder (or a weights file in it)", required=True)
flags.DEFINE_string("input", None, "a .nii / .nii.gz scan, or a folder of them", required=True)
flags.DEFINE_string("output", None, "folder for the segmentations", required=True)
flags.DEFINE_bool("probabilities", False, "also write <name>_probs.nii.gz (one channel per class)")
flags.DEFINE_bool("tta", False, "average over the 8 flips of the three axes (test-time augmentation)")
flags.DEFINE_bool("figures", False, "also write <name>.png: a slice with the segmentation overlaid")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "compute dtype (default: the run's)")
flags.DEFINE_string("compilation_cache", "auto", "persistent XLA compilation cache: 'auto', a folder, or 'off'")


def main(argv):
    del argv
    from tqdm import tqdm

    from jaxseg.compilation_cache import enable_compilation_cache
    from jaxseg.errors import UserError
    from jaxseg.predict import load_model, model_predictor, predict_file

    src = Path(FLAGS.input)
    scans = sorted(p for p in src.iterdir() if p.name.endswith((".nii", ".nii.gz"))) if src.is_dir() else [src]
    if not scans or not all(p.is_file() for p in scans):
        raise UserError(f"{src}: no .nii / .nii.gz scan found")
    enable_compilation_cache(FLAGS.compilation_cache)
    model, params, prep = load_model(FLAGS.model, FLAGS.dtype)
    predict = model_predictor(model, params, prep, flip_tta=FLAGS.tta)
    results = []
    for path in tqdm(scans, desc="predict", unit="scan"):
        results.append(predict_file(path, predict, prep, FLAGS.output, FLAGS.probabilities, FLAGS.figures))
        print(f"{path.name}: {results[-1]['segmentation']} voxels {results[-1]['voxels']}", flush=True)
    (Path(FLAGS.output) / "predictions.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    cli.run(main)
