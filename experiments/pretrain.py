"""Staged unsupervised pre-training.

    python -m experiments.pretrain --config=small --objective=comparative --workdir=runs/demo
"""

from absl import app

from experiments.common import FLAGS, config_from_flags
from jaxseg.train.run import run_pretraining


def main(argv):
    del argv
    _, summary = run_pretraining(config_from_flags(), FLAGS.workdir, progress=FLAGS.progress)
    print(f"pre-training ({summary['objective']}): {summary['steps']} steps, {summary['train_s']:.1f} s "
          f"(+{summary['compile_s']:.1f} s compile)")


if __name__ == "__main__":
    app.run(main)
