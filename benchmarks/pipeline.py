"""Crops per second of the pre-training and fine-tuning input pipelines, read from the cache.

    python -m benchmarks.pipeline --json_out=benchmarks/results_pipeline_cpu.json

Builds a phantom dataset and its cache in --workdir, then pulls --steps batches through each
pipeline (after --warmup) for several thread counts and, for a run of M processes (--hosts),
what one host makes: its 1/M of the rows of every global batch (the pipelines shard by process).
Reported: one host's seconds per global step and crops/s (median over 3 repeats); a host's work
per step should fall as 1/M.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from absl import app, flags

from benchmarks.timing import machine, write_json
from jaxseg.config import Config
from jaxseg.data import (Cache, finetune_dataset, load_dataset_json,
                         make_iterator, prepare, pretrain_dataset, write_phantom_dataset)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "where to write the phantom data and cache (default: a temp dir)")
flags.DEFINE_integer("subjects", 20, "phantom subjects")
flags.DEFINE_integer("crop_size", 96, "crop size")
flags.DEFINE_integer("steps", 20, "timed batches per repeat")
flags.DEFINE_integer("warmup", 3, "untimed batches")
flags.DEFINE_list("threads", ["1", "2", "4"], "grain read threads to try")
flags.DEFINE_list("hosts", ["1", "2", "4"], "processes M of a run: time host 0's share of each global batch")
flags.DEFINE_string("json_out", None, "write results here")


def seconds_per_step(ds, threads: int, first_epoch: int) -> tuple[float, float]:
    """(median s / step of 3 repeats of FLAGS.steps after FLAGS.warmup, s / step of the first
    ``first_epoch`` steps). One dataset, as a training run keeps it: the first epoch is where
    each fine-tuning volume's crop centres are found (once per volume and run)."""
    it = make_iterator(ds, num_threads=threads, prefetch=2 * threads)
    t0 = time.perf_counter()
    for _ in range(first_epoch):
        next(it)
    first = (time.perf_counter() - t0) / first_epoch
    times = []
    for _ in range(3):
        it = make_iterator(ds, num_threads=threads, prefetch=2 * threads)
        for _ in range(FLAGS.warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            next(it)
        times.append((time.perf_counter() - t0) / FLAGS.steps)
    return statistics.median(times), first


def main(argv):
    del argv
    work = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="jaxseg-pipe-"))
    data = write_phantom_dataset(work / "data", "spleen", FLAGS.subjects)
    prepare(load_dataset_json(data), work / "cache", progress=False)
    cache = Cache(work / "cache")
    cfg = Config().replace(crop_size=FLAGS.crop_size)  # the paper's batches: 2 volumes x 2 crops, 1 x 4
    pre, fin = cfg.pretrain, cfg.finetune
    rows = []
    for threads in map(int, FLAGS.threads):
        for hosts in map(int, FLAGS.hosts):
            shard = (0, hosts)
            for name, make, per_step, volumes in (
                ("pretrain", lambda: pretrain_dataset(cache, cache.training, cfg, seed=0, shard=shard),
                 pre.volumes_per_step * pre.crops_per_volume, pre.volumes_per_step),
                ("finetune", lambda: finetune_dataset(cache, cache.training, cfg, seed=0, shard=shard),
                 fin.volumes_per_step * fin.crops_per_volume, fin.volumes_per_step),
            ):
                epoch = -(-len(cache.training) // volumes)  # steps until every volume was used once
                sec, first = seconds_per_step(make(), threads, epoch)
                rows.append({"pipeline": name, "threads": threads, "hosts": hosts, "host_s_per_step": sec,
                             "crops_per_s": per_step / hosts / sec, "first_epoch_host_s_per_step": first})
                print(f"{name:9s} threads={threads} hosts={hosts}: one host {sec * 1e3:7.1f} ms per global step, "
                      f"{per_step / hosts / sec:8.1f} crops/s ({FLAGS.crop_size}^3); first epoch "
                      f"{first * 1e3:.1f} ms per step", flush=True)
    write_json(FLAGS.json_out, {"machine": machine(), "crop_size": FLAGS.crop_size, "rows": rows})


if __name__ == "__main__":
    app.run(main)
