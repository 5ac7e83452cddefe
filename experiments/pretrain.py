"""Staged unsupervised pre-training.

    python -m experiments.pretrain --config=small --objective=comparative --workdir=runs/demo
"""


from experiments import cli
from experiments.common import FLAGS, config_from_flags, start_process
from jaxseg.workflow import run_pretraining


def main(argv):
    del argv
    cfg = config_from_flags()
    start_process()
    _, summary = run_pretraining(cfg, FLAGS.workdir, progress=FLAGS.progress,
                                 overwrite=FLAGS.overwrite)
    print(f"pre-training ({summary['objective']}): {summary['steps']} steps, {summary['train_s']:.1f} s training "
          f"(compilation apart: {summary['compile_s']:.1f} s)")
    probe = summary["probe"]
    print("probe, partition of anatomy from enc4 features (chance {:.2f}): ".format(probe["random_init"]["chance"])
          + " -> ".join(f"{k} {v['anatomy_accuracy']:.2f}" for k, v in probe.items()))


if __name__ == "__main__":
    cli.run(main)
