"""Flags shared by the entry points: --config picks a preset; every setting is a flag, by its
flat name (``jaxseg.config.FLAT_NAMES``: --objective sets ``cfg.pretrain.objective``)."""

from __future__ import annotations

from absl import flags

from experiments import cli  # noqa: F401  (--verbose)
from jaxseg.config import FLAT_NAMES, PRESETS, Config, get_config

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "small", sorted(PRESETS), "preset: tiny (tests), small (CPU main job), small_long (small at 64^3: a 4x4x4 token grid), gpu (one GPU), paper")
flags.DEFINE_string("workdir", "runs/default", "work dir: data cache, checkpoints, metrics, figures")
flags.DEFINE_bool("progress", True, "progress bars")
flags.DEFINE_bool("overwrite", False, "replace results in the work dir that were made with other settings")
flags.DEFINE_bool("allow_unverified_weights", False, "load an input weights file (--init, --params) that has no "
                  "checksum (an older jaxseg's); `python -m experiments.accept_weights` gives it one for good")
flags.DEFINE_string("compilation_cache", "auto",
                    "persistent XLA compilation cache: 'auto' (~/.cache/jaxseg/xla or $JAXSEG_CACHE_DIR), "
                    "a folder, or 'off'")
flags.DEFINE_string("coordinator", None, "multi-host: coordinator address host:port (on SLURM / Open MPI: detected)")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's id")
flags.DEFINE_integer("heartbeat_timeout", 100, "multi-host: seconds before a silent process counts as gone "
                     "(the others then exit within a third of it)", lower_bound=10)
flags.DEFINE_integer("init_timeout", 300, "multi-host: seconds the processes wait for each other at start",
                     lower_bound=5)
for _name, _value in Config().flat().items():
    _kind = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(
        type(_value), flags.DEFINE_string)
    _kind(_name, None, f"override the preset's {'.'.join(FLAT_NAMES[_name])}")


def config_from_flags() -> Config:
    """The config from --config and the field flags, validated before any data or compile work
    (an impossible setting raises ``UserError``)."""
    overrides = {k: FLAGS[k].value for k in FLAT_NAMES if FLAGS[k].value is not None}
    return get_config(FLAGS.config, **overrides)


def start_process() -> None:
    """What a training process sets up once, after its flags are checked: quiet library logs,
    the persistent compilation cache, and (multi-host) ``jax.distributed``, whose processes
    must then agree on every setting before any data or compile work."""
    from absl import logging

    from jaxseg.compilation_cache import enable_compilation_cache
    from jaxseg.distributed import agree, initialize

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    # Identical programs (a rerun, each fine-tuning run, each evaluation) compile once per machine.
    enable_compilation_cache(FLAGS.compilation_cache)
    initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, FLAGS.heartbeat_timeout,
               FLAGS.init_timeout)
    agree("settings", job_flags(), hint="Start every process with the same command; only --process_id differs.")


# Flags that may differ between the processes of one run: they change nothing in its results.
PER_PROCESS_FLAGS = ("process_id", "verbose", "progress", "compilation_cache")


def job_flags() -> dict:
    """Every flag of this entry point and of jaxseg's common ones, by name (absl's own aside)."""
    mine = [f for module, fs in FLAGS.flags_by_module_dict().items()
            if module == "__main__" or module.startswith("experiments") for f in fs]
    return {f.name: f.value for f in mine if f.name not in PER_PROCESS_FLAGS}
