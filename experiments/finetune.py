"""Supervised fine-tuning (optionally from a pre-trained params.msgpack).

    python -m experiments.finetune --config=small --workdir=runs/demo --init=runs/demo/pretrain/params.msgpack
"""

from absl import flags

from experiments import cli
from experiments.common import FLAGS, config_from_flags, start_process
from jaxseg.workflow import run_finetuning

flags.DEFINE_string("init", None, "params.msgpack to start from (default: random init)")
flags.DEFINE_string("out_name", "finetune", "output folder inside the work dir")


def main(argv):
    del argv
    cfg = config_from_flags()
    start_process()
    _, summary = run_finetuning(cfg, FLAGS.workdir, init=FLAGS.init, out_name=FLAGS.out_name,
                                progress=FLAGS.progress, overwrite=FLAGS.overwrite,
                                allow_unverified_weights=FLAGS.allow_unverified_weights)
    print(f"fine-tuning: best validation Dice {summary['best']['val_dice']:.3f} at step {summary['best']['step']}")


if __name__ == "__main__":
    cli.run(main)
