"""How an entry point runs: a user error (bad flags, data or work dir) prints one clear message
and exits with status 2, without a traceback unless --verbose; a multi-process run that cannot go
on (a peer gone, a barrier timed out) exits with 3, naming the process; SIGTERM checkpoints and
exits with 143."""

from __future__ import annotations

import faulthandler
import os
import sys
import time
import traceback
from typing import Callable

from absl import app, flags

from jaxseg import distributed
from jaxseg.errors import UserError, first_line

flags.DEFINE_bool("verbose", False, "show the full traceback of a user error")


def _fail(message: str, code: int) -> None:
    distributed.leaving()  # one line from this process: its own, not a watchdog's about a peer
    print(message, file=sys.stderr, flush=True)
    if not flags.FLAGS.verbose:  # what libraries print while tearing down (a full disk's retries) says no more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    if distributed.multi_process():
        # The others would wait for this process at their next barrier: tell them, and skip
        # jax.distributed's shutdown, which waits for every process. Process 0 hosts the store
        # the message goes through: give the others a moment to read it.
        distributed.announce_failure(message)
        sys.stdout.flush()
        if distributed.is_primary():
            time.sleep(3)
        os._exit(code)
    sys.exit(code)


def run(main: Callable) -> None:
    def wrapped(argv):
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # no library INFO noise (JAX backends, orbax saves) before ours
        if not flags.FLAGS.verbose:
            # A peer lost ends a multi-process run in XLA's fatal log (an abort, not interceptable
            # from Python); the dump of every Python thread that absl's faulthandler adds says nothing more.
            faulthandler.disable()
        try:
            result = main(argv)
            # Every process finished: only now may one leave, since a peer failing while this one
            # sits in jax.distributed's shutdown aborts it with a stack dump instead of one line.
            distributed.barrier("finished")
            distributed.leaving()
            return result
        except distributed.Preempted as e:
            distributed.leaving()
            print(f"preempted: {e}", file=sys.stderr, flush=True)
            sys.exit(distributed.PREEMPTED_EXIT_CODE)
        except (UserError, distributed.DistributedError) as e:
            if flags.FLAGS.verbose:
                raise
            _fail(f"error: {e}", 2 if isinstance(e, UserError) else distributed.PEER_EXIT_CODE)
        except Exception as e:
            if not distributed.multi_process():
                raise
            if "JaxRuntimeError" in type(e).__name__ and not flags.FLAGS.verbose:
                distributed.await_peer_verdict()  # a collective fails when a peer dies: let the watchdog name it
            traceback.print_exc()  # a crash of this process: the others must not wait for it
            _fail(f"error: crashed ({type(e).__name__}: {first_line(e, 300, empty='')})", 1)

    app.run(wrapped)
