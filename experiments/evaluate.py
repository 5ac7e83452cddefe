"""Evaluate parameters on the held-out test split: CSV, summary table, NIfTI predictions, figures.

    python -m experiments.evaluate --config=small --workdir=runs/demo --params=runs/demo/finetune/best.msgpack
"""

from pathlib import Path

from absl import flags

from experiments import cli
from experiments.common import FLAGS, config_from_flags, start_process
from jaxseg.distributed import is_primary
from jaxseg.errors import UserError
from jaxseg.evaluate import summary_markdown
from jaxseg.predict import MODEL_CARD, card_beside, card_settings
from jaxseg.workflow import run_evaluation

flags.DEFINE_string("params", None, "params.msgpack to evaluate", required=True)
flags.DEFINE_string("out_name", "eval", "output folder inside the work dir")
flags.DEFINE_enum("split", "test", ["test", "val"], "which held-out split")


def main(argv):
    del argv
    cfg = with_model_card(config_from_flags(), FLAGS.params)
    start_process()
    summary = run_evaluation(cfg, FLAGS.workdir, FLAGS.params, FLAGS.out_name, FLAGS.split, progress=FLAGS.progress,
                             overwrite=FLAGS.overwrite, allow_unverified_weights=FLAGS.allow_unverified_weights)
    if is_primary():
        print(f"{Path(FLAGS.workdir) / FLAGS.out_name / 'summary.md'}:\n{summary_markdown(summary)}")


def with_model_card(cfg, params: str):
    """``cfg`` with the network and grid of the model being evaluated (its ``model.json``): a
    model is only measured on the preprocessing it was trained with; a flag that says otherwise
    is refused."""
    card = card_beside(params)
    if card is None:
        return cfg
    fixed = card_settings(card)
    clash = [f"--{k}={FLAGS[k].value} (the model: {v})" for k, v in fixed.items()
             if FLAGS[k].present and cfg.flat()[k] != v]
    if clash:
        raise UserError(f"{params}: this model was trained with other settings than {', '.join(clash)}; it is "
                        f"evaluated with its own (its {MODEL_CARD}): drop those flags")
    return cfg.replace(**fixed)


if __name__ == "__main__":
    cli.run(main)
