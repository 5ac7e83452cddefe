"""Validate and preprocess an MSD-format dataset into a cache root, once, for every job that
uses the same flags (``--config`` and the data settings, named as in every job).

    python -m experiments.prepare --config=paper --data_dir=/data/Task09_Spleen --cache_dir=/cache/spleen
    python -m experiments.pretrain --config=paper --data_dir=/data/Task09_Spleen --cache_dir=/cache/spleen ...
    python -m experiments.prepare --write_phantom --data_dir=/tmp/phantom --cache_dir=/tmp/cache
"""

from absl import flags

from experiments import cli
from experiments.common import FLAGS, config_from_flags
from jaxseg.data import load_dataset_json, prepare, write_phantom_dataset
from jaxseg.data.cache import cache_key
from jaxseg.errors import UserError

flags.DEFINE_bool("write_phantom", False, "first write a phantom dataset (--phantom, --phantom_subjects, "
                  "--data_seed) into --data_dir")
flags.DEFINE_integer("workers", 0, "worker processes at most (0: one per core); started only when they finish "
                     "sooner than this process alone (usually full-size scans; small phantoms stay in this one)", lower_bound=0)


def main(argv):
    del argv
    cfg = config_from_flags()  # validated before any work
    d = cfg.data
    if not d.dir or not d.cache_dir:
        raise UserError("--data_dir (the MSD folder) and --cache_dir (the cache root every job is given) are "
                        "both needed")
    if FLAGS.write_phantom:
        write_phantom_dataset(d.dir, d.phantom, d.phantom_subjects, seed=d.seed)
    info = load_dataset_json(d.dir)
    folder = f"{d.cache_dir.rstrip('/')}/{cache_key(info, cfg.prepare())}"
    status = prepare(info, folder, cfg.prepare(), workers=FLAGS.workers or None, progress=FLAGS.progress)
    print(f"cache at {folder}: {status}")


if __name__ == "__main__":
    cli.run(main)
