"""Evaluate parameters on the held-out test split: CSV, summary table, NIfTI predictions, figures.

    python -m experiments.evaluate --config=small --workdir=runs/demo --params=runs/demo/finetune/best.msgpack
"""

from absl import flags

from experiments import cli
from experiments.common import FLAGS, config_from_flags, start_process
from jaxseg.workflow import run_evaluation

flags.DEFINE_string("params", None, "params.msgpack to evaluate", required=True)
flags.DEFINE_string("out_name", "eval", "output folder inside the work dir")
flags.DEFINE_enum("split", "test", ["test", "val"], "which held-out split")


def main(argv):
    del argv
    cfg = config_from_flags()
    start_process()
    run_evaluation(cfg, FLAGS.workdir, FLAGS.params, FLAGS.out_name, FLAGS.split, progress=FLAGS.progress,
                   overwrite=FLAGS.overwrite)
    print((FLAGS.workdir.rstrip("/") + f"/{FLAGS.out_name}/summary.md") + ":")
    print(open(f"{FLAGS.workdir}/{FLAGS.out_name}/summary.md").read())


if __name__ == "__main__":
    cli.run(main)
