"""How an entry point runs: a user error (bad flags, data or work dir) prints one clear message
and exits with status 2, without a traceback unless --verbose."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

from jaxseg.errors import UserError

flags.DEFINE_bool("verbose", False, "show the full traceback of a user error")


def run(main: Callable) -> None:
    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            if flags.FLAGS.verbose:
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped)
