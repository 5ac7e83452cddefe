"""Preprocess an MSD-format dataset into jaxseg's cache (validates every case first).

    python -m experiments.prepare --data_dir=/data/Task09_Spleen --out_dir=/cache/spleen
    python -m experiments.prepare --phantom=spleen --data_dir=/tmp/phantom --out_dir=/tmp/cache
"""

from absl import flags

from experiments import cli
from jaxseg.data import PrepareConfig, load_dataset_json, prepare, write_phantom_dataset
from jaxseg.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "MSD dataset folder (with dataset.json)", required=True)
flags.DEFINE_string("out_dir", None, "cache folder to write", required=True)
flags.DEFINE_enum("phantom", None, ["spleen", "braintumour"], "first write a phantom dataset into --data_dir")
flags.DEFINE_integer("phantom_subjects", 20, "subjects for --phantom", lower_bound=1)
flags.DEFINE_list("spacing", ["1.0", "1.0", "1.0"], "target spacing in mm")
flags.DEFINE_integer("workers", 0, "processes (0: one per core)", lower_bound=0)
flags.DEFINE_bool("include_test", False, "also cache the unlabelled test images")
flags.DEFINE_bool("progress", True, "progress bar")


def main(argv):
    del argv
    try:
        spacing = tuple(float(s) for s in FLAGS.spacing)
    except ValueError:
        raise UserError(f"--spacing must be three numbers in mm, got {','.join(FLAGS.spacing)}") from None
    cfg = PrepareConfig(target_spacing=spacing)  # validated before any work
    if FLAGS.phantom:
        write_phantom_dataset(FLAGS.data_dir, FLAGS.phantom, FLAGS.phantom_subjects)
    status = prepare(load_dataset_json(FLAGS.data_dir), FLAGS.out_dir, cfg, workers=FLAGS.workers or None,
                     include_test=FLAGS.include_test, progress=FLAGS.progress)
    print(f"cache at {FLAGS.out_dir}: {status}")


if __name__ == "__main__":
    cli.run(main)
