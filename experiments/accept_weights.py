"""Give weights files you trust a checksum, once: a jaxseg ``.msgpack`` without one (an older
jaxseg's) is rewritten with its header; a MONAI ``.pt`` gets ``NAME.pt.sha256`` beside it. From
then on every jaxseg job verifies them, and refuses them if they change.

    python -m experiments.accept_weights --path=old/params.msgpack --path=monai_unetr.pt
"""

from absl import flags

from experiments import cli
from jaxseg.io import accept_weights

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("path", None, "a weights file you trust", required=True)


def main(argv):
    del argv
    for path in FLAGS.path:
        print(accept_weights(path))


if __name__ == "__main__":
    cli.run(main)
