"""The paper's experiment in one command (the main job). With no --data_dir it generates phantom
data and uses the small config, finishing on a 2-core CPU in minutes; --config=paper for the
paper's sizes.

    python -m experiments.table1 --workdir=runs/table1
"""

from absl import flags

from experiments import cli
from experiments.common import FLAGS, config_from_flags, start_process
from jaxseg.errors import UserError
from jaxseg.distributed import is_primary
from jaxseg.report import report_markdown
from jaxseg.table1 import run_table1

flags.DEFINE_list("objectives", ["contrastive", "comparative"], "pre-training objectives to compare")
flags.DEFINE_list("budgets", ["2"], "label budgets (0: all labelled training cases), run in this order")
flags.DEFINE_integer("seeds", 3, "repeat pre-training and fine-tuning over this many seeds (--seed, --seed + 1, ...)")


def main(argv):
    del argv
    for single, plural in (("objective", "objectives"), ("label_budget", "budgets")):
        if FLAGS[single].present:  # table1 sets these itself, run by run: one way to choose them
            raise UserError(f"--{single} does not apply to table1, which runs every one of --{plural}; "
                            f"use --{plural}={FLAGS[single].value}")
    cfg = config_from_flags()
    start_process()
    try:
        budgets = tuple(int(b) for b in FLAGS.budgets)
    except ValueError:
        raise UserError(f"--budgets must be integers (0: all labelled cases), got {FLAGS.budgets}") from None
    result = run_table1(cfg, FLAGS.workdir, tuple(FLAGS.objectives), budgets, seeds=FLAGS.seeds,
                        progress=FLAGS.progress, overwrite=FLAGS.overwrite)
    if not is_primary():
        return
    print(report_markdown(result))
    print(f"every number: {FLAGS.workdir}/table1.json; figures: {FLAGS.workdir}/pretrain_loss.png, "
          f"{FLAGS.workdir}/seed*/finetune_*/test/figures/")


if __name__ == "__main__":
    cli.run(main)
