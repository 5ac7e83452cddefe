"""Everything about processes, one small module per concern: ``processes`` (starting a
multi-process run, barriers, settings every process must share, work split and gathered),
``watchdog`` (a peer gone ends the run with one line), ``locks`` (one writer per output
folder), ``preemption`` (SIGTERM as a request to checkpoint and stop), and ``jax_shim`` (the one
place that reaches into JAX's private modules)."""

from jaxseg.distributed.locks import acquire_folder, locked, release_folder, sole_writer
from jaxseg.distributed.preemption import PREEMPTED_EXIT_CODE, Preempted, StopRequest
from jaxseg.distributed.processes import (BARRIER_TIMEOUT_S, HEARTBEAT_TIMEOUT_S, INIT_TIMEOUT_S, PEER_EXIT_CODE,
                                          DistributedError, agree, allgather_json, barrier, check_start,
                                          cluster_size_from_env, initialize, is_primary, leaving, local_copy, multi_process,
                                          my_share, share)
from jaxseg.distributed.watchdog import PeerWatchdog, announce_failure, await_peer_verdict

__all__ = ["BARRIER_TIMEOUT_S", "HEARTBEAT_TIMEOUT_S", "INIT_TIMEOUT_S", "PEER_EXIT_CODE", "PREEMPTED_EXIT_CODE",
           "DistributedError", "PeerWatchdog", "Preempted", "StopRequest", "acquire_folder", "agree", "locked",
           "allgather_json", "announce_failure", "await_peer_verdict", "barrier", "check_start",
           "cluster_size_from_env", "initialize", "is_primary", "leaving", "local_copy", "multi_process", "my_share",
           "share",
           "release_folder", "sole_writer"]
