"""One Table 1 from table1 runs over other seeds of the same settings: run a seed per process,
machine or array task (``table1 --seed=K --seeds=1 --workdir=runs/sK``), then

    python -m experiments.merge_table1 --workdir=runs/merged runs/s0 runs/s1 runs/s2

reports them as one table1 over those seeds would (intervals over all seeds x test cases).
"""

from absl import flags

from experiments import cli
from jaxseg.report import report_markdown
from jaxseg.table1 import merge_table1

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "where the merged table1.json, table1.md and figures go", required=True)


def main(argv):
    result = merge_table1(argv[1:], FLAGS.workdir)
    print(report_markdown(result))
    print(f"every number: {FLAGS.workdir}/table1.json; figures: {FLAGS.workdir}/pretrain_loss.png")


if __name__ == "__main__":
    cli.run(main)
