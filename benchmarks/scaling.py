"""What a data-parallel step costs on N devices: the measured single-device step plus the
gradient all-reduce, from the parameter count and link bandwidths (a model, not a measurement).

    python -m benchmarks.scaling --step_ms=29.1

Per-device batch fixed (weak scaling): every device computes what one device does, then the
gradients (fp32, one per parameter) are all-reduced. A ring all-reduce moves
2 (N-1)/N x bytes through each device's slowest link; within a node that is NVLink, across nodes
each GPU's share of the network. The table gives the step time with the all-reduce exposed (no
overlap: the worst case) and the scaling efficiency; XLA overlaps part of it with the backward
pass, so real runs land between that and the compute-only time.
"""

from __future__ import annotations

import jax
from absl import app, flags

from jaxseg.models import count_params, init_params, unetr_from_preset
from jaxseg.models.flops import unetr_flops

FLAGS = flags.FLAGS
flags.DEFINE_float("step_ms", 29.1, "measured single-device training step (ms): paper UNETR 96^3 batch 4, bf16, H200")
flags.DEFINE_integer("batch", 4, "per-device batch of that step")
flags.DEFINE_float("nvlink_gbps", 450.0, "per-GPU all-reduce bus bandwidth within a node (GB/s)")
flags.DEFINE_float("network_gbps", 50.0, "per-GPU network bandwidth across nodes (GB/s; 400 Gb/s NIC per GPU)")
flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node")
flags.DEFINE_integer("grad_bytes", 4, "bytes per gradient element (4: fp32; 2: all-reduce in bf16)")


def allreduce_s(n: int, nbytes: float, gbps: float) -> float:
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / (gbps * 1e9)


def main(argv):
    del argv
    model = unetr_from_preset("paper", in_channels=1, out_channels=2, img_size=96)
    params = count_params(jax.eval_shape(lambda: init_params(model, 0)))  # shapes only: nothing computed
    nbytes = params * FLAGS.grad_bytes
    flops = unetr_flops(model, FLAGS.batch, "train")
    step = FLAGS.step_ms / 1e3
    print(f"UNETR paper size: {params:,} parameters, {nbytes / 1e6:.0f} MB of gradients per all-reduce; "
          f"{flops / 1e12:.2f} TFLOP per step of {FLAGS.batch} crops per device "
          f"({flops / step / 1e12:.0f} TFLOP/s achieved at {FLAGS.step_ms} ms)\n")
    print("| devices | nodes | all-reduce (ms) | step, all-reduce exposed (ms) | crops/s | efficiency |")
    print("|---|---|---|---|---|---|")
    for n in (1, 2, 4, 8, 16, 32, 64):
        nodes = max(1, n // FLAGS.gpus_per_node)
        bw = FLAGS.nvlink_gbps if nodes == 1 else FLAGS.network_gbps
        ar = allreduce_s(n, nbytes, bw)
        total = step + ar
        print(f"| {n} | {nodes} | {ar * 1e3:.1f} | {total * 1e3:.1f} | {n * FLAGS.batch / total:.0f} | "
              f"{step / total:.0%} |")


if __name__ == "__main__":
    app.run(main)
