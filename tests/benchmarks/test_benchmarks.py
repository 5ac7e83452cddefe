"""Benchmark plumbing: the analytic FLOP count against XLA's, and the GPU script at toy size."""

import json

import jax
import jax.numpy as jnp
import pytest

from jaxseg.models import UNETR, init_params, unetr_from_preset
from jaxseg.models.flops import layer_costs, pretrain_step_cost, roofline_s, unetr_cost, unetr_flops


def _xla_flops(fn, *args) -> float:
    ca = jax.jit(fn).lower(*args).cost_analysis()  # of the HLO as lowered: within 1% of the compiled one's, no compile
    return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])


def test_analytic_flops_match_xla_cost_analysis_on_cpu():
    """XLA:CPU counts convolutions (GPU cost analysis does not: cuDNN custom calls). Ours counts
    the matrix work only, so it may sit below XLA's by the elementwise ops, never above."""
    m = unetr_from_preset("small", in_channels=1, out_channels=2, img_size=32, conv_impl="xla")
    x = jnp.zeros((2, 32, 32, 32, 1))
    params = init_params(m)
    got = {
        "forward": (unetr_flops(m, 2), _xla_flops(m.apply, params, x)),
        "encode": (unetr_flops(m, 2, part="encode"),
                   _xla_flops(lambda p, x: m.apply(p, x, method=UNETR.encode), params, x)),
        "train": (unetr_flops(m, 2, "train"),
                  _xla_flops(jax.grad(lambda p, x: jnp.mean(m.apply(p, x) ** 2)), params, x)),
    }
    for kind, (ours, xla) in got.items():
        assert 0.95 * xla <= ours <= xla, (kind, ours, xla)


def test_flop_count_structure():
    m = unetr_from_preset("paper", in_channels=1, out_channels=2, img_size=96)
    per_layer = layer_costs(m)
    assert set(per_layer) >= {"vit.blocks", "encoder1", "decoder2", "out"}
    fwd = unetr_flops(m)
    assert 135e9 < fwd < 146e9  # ~146 GFLOP by the 27 S^3 hand count, less the padding taps
    assert unetr_flops(m, 4) == pytest.approx(4 * fwd)
    assert 2.9 * fwd < unetr_flops(m, 1, "train") < 3 * fwd
    assert pretrain_step_cost(m, 4, "decoder").flops == pytest.approx(3 * unetr_flops(m, 4, "train"))
    assert pretrain_step_cost(m, 4, "encoder").flops < pretrain_step_cost(m, 4, "decoder").flops / 3
    bf16 = unetr_from_preset("paper", in_channels=1, out_channels=2, img_size=96, dtype=jnp.bfloat16)
    assert unetr_cost(bf16).bytes < unetr_cost(m).bytes  # 2-byte activations
    c = unetr_cost(bf16, 4, "train")
    assert roofline_s(c, 989e12, 4.8e12) == max(c.flops / 989e12, c.bytes / 4.8e12)


@pytest.mark.slow
def test_gpu_script_runs_at_toy_size_on_cpu(gpu_script_out):
    """benchmarks/run_gpu.sh with JAXSEG_BENCH_SIZE=tiny (run in the background: tests/conftest.py):
    every part writes its JSON, the summary has every section, and no more files come back than
    the device tool returns (8)."""
    out = gpu_script_out
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"model_step.json", "pretrain.json", "inference.json", "loss_scaling.json",
                                "checkpoint.json", "summary.md", "log.txt"} <= set(files), files
    model = json.loads((out / "model_step.json").read_text())
    assert any(r.get("framework") == "monai" for r in model["rows"])  # the reference ran beside jaxseg
    assert any("ratio" in r and r["median"] > 0 for r in model["rows"])
    pre = json.loads((out / "pretrain.json").read_text())
    # sampled triplets, on device and from the grain pipeline
    assert [(r["stage"], r["objective"], r["source"]) for r in pre["rows"]] == [
        ("encoder", "comparative_sampled", "device"), ("encoder", "comparative_sampled", "pipeline")]
    assert all(r["median_s"] > 0 and r["flops"] > 0 for r in pre["rows"]) and pre["rows"][0]["compile_s"] > 0
    inf = json.loads((out / "inference.json").read_text())
    assert inf["rows"][0]["monai"] and max(m["max_rel_diff"] for m in inf["rows"][0]["monai"].values()) < 1e-4
    summary = (out / "summary.md").read_text()
    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert [r["handoff"] for r in ckpt["rows"]] == ["device", "host", "background"]
    assert all(0 < r["first_s"] <= r["first_written_s"] for r in ckpt["rows"])
    for section in ("UNETR step", "Pre-training step", "Sliding-window inference", "Loss + gradient", "Checkpoint save"):
        assert section in summary
    assert (out / "loss_scaling.png").stat().st_size > 1000
    assert "exit 124" not in (out / "log.txt").read_text()
