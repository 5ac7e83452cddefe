"""Training: freezing, convergence rule, resume equals uninterrupted, NaN stop, checkpoints."""

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.errors import UserError

from jaxseg.config import get_config
from jaxseg.data import make_iterator, pretrain_dataset
from jaxseg.io import load_weights, save_weights
from jaxseg.train.checkpoint import Checkpointer, check_workdir
from jaxseg.train.hooks import Convergence, converged
from jaxseg.train.loop import DeviceFeed, NonFiniteLossError, Run, run_loop
from jaxseg.train.pretrain import make_pretrain_step, pretrain_state
from jaxseg.models import init_params
from jaxseg.workflow import make_model
from jaxseg.train.sharding import data_mesh, replicate, shard_batch

from tests.runs import ROOT, cpu_env

CFG = get_config("tiny")


@pytest.fixture
def cache(spleen_cache):
    return spleen_cache


def _setup(cache, cfg, stage):
    model = make_model(cfg, cache.task)
    params = init_params(model, cfg.seed)
    state, tx = pretrain_state(model, params, cfg, stage)
    step = make_pretrain_step(model, tx, cfg.pretrain, stage, multilabel=False)
    ds = pretrain_dataset(cache, cache.training, cfg, seed=0)
    return model, state, step, ds


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("stage, freeze, frozen_prefixes", [
    ("encoder", False, ("['params']['decoder", "['params']['encoder1']", "['params']['encoder2']",
                     "['params']['encoder3']", "['params']['out']", "['params']['vit']['norm']")),
    ("decoder", True, ("['params']['vit']", "['params']['encoder")),
])
def test_frozen_leaves_stay_bit_identical(cache, stage, freeze, frozen_prefixes):
    cfg = CFG.replace(stage2_freeze_encoder=freeze, lr=1e-2, weight_decay=0.1)
    _, state, step, ds = _setup(cache, cfg, stage)
    before = _flat(state.params)
    for k in range(2):
        state, metrics = step(state, {k2: jnp.asarray(v) for k2, v in ds[k].items()})
    after = _flat(state.params)
    frozen = [k for k in before if k.startswith(frozen_prefixes)]
    trained = [k for k in before if k not in frozen]
    assert frozen and trained
    for k in frozen:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert sum(not np.array_equal(after[k], before[k]) for k in trained) >= len(trained) // 2
    assert np.isfinite(float(metrics["loss"])) and "loss_axis2" in metrics


def test_sequential_step_is_one_graph_with_the_unrolled_numbers(cache, stage="encoder"):
    """The three axis updates share one compiled update and give what three unrolled updates
    (one graph per axis, as before) give: same losses, same parameters. (Stage 'encoder' only: the
    stage changes what the features are, not how the axes are stepped, and it compiles fastest.)"""
    import optax

    from jaxseg.train.pretrain import axis_loss, stage_features
    from jaxseg.train.state import create_state

    model = make_model(CFG, cache.task)
    tx = optax.sgd(0.5)  # plain SGD: parameters compare tightly (Adam amplifies rounding of ~0 gradients)
    state = create_state(init_params(model, CFG.seed), tx)
    step = make_pretrain_step(model, tx, CFG.pretrain, stage, multilabel=False)
    ds = pretrain_dataset(cache, cache.training, CFG, seed=0)
    batches = [{k: jnp.asarray(v) for k, v in ds[i].items()} for i in range(2)]

    @jax.jit
    def unrolled(params, batch):
        losses = []
        for a in range(3):
            def loss_fn(p):
                f = stage_features(model, p, batch["image"], stage, CFG.pretrain.stage2_output, False)
                return axis_loss(f, a, batch["offset_u"][a], None, CFG.pretrain)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)
            losses.append(loss)
        return params, losses

    params = state.params
    state = jax.tree_util.tree_map(jnp.array, state)
    for batch in batches:
        params, want = unrolled(params, batch)
        state, metrics = step(state, batch)
        np.testing.assert_allclose([float(metrics[f"loss_axis{a}"]) for a in range(3)], np.array(want), rtol=1e-5)
    assert int(state.step) == 2
    assert step.update._cache_size() == 1  # one compiled program for all three axes and both steps
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_old_stage_names_still_work_with_a_deprecation_warning():
    from jaxseg.models import pretraining_stage, trainable_in_stage

    for old, new in (("feat", "encoder"), ("recon", "decoder")):
        with pytest.warns(DeprecationWarning, match=f"use '{new}'"):
            assert pretraining_stage(old) == new
    with pytest.raises(ValueError, match="unknown pre-training stage 'stage1'"):
        trainable_in_stage("stage1", 4)


def test_convergence_rule_on_synthetic_losses():
    assert not converged([1.0] * 10)  # needs a full window before the current loss
    assert converged([1.0] * 10 + [1.005])
    assert not converged([1.0] * 10 + [1.02])
    decreasing = [1.0 / (1 + 0.5 * k) for k in range(40)]
    assert not converged(decreasing[:12])
    assert converged([-2.0] * 10 + [-2.01])  # relative to |mean|
    assert converged([1.0] * 4 + [0.5] * 5, window=4, rtol=0.01)


def test_min_steps_delays_the_rule_and_both_steps_are_reported(tmp_path):
    """A loss flat from the start meets the paper's rule at step 11; a warm-up of 25 steps runs
    on to 25 and still reports where the rule first held."""
    import grain

    from jaxseg.train.state import TrainState

    def flat_step(state, batch):
        return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0)}

    ds = grain.MapDataset.range(1000).map(lambda k: {"x": np.zeros(1, np.float32)})
    state = TrainState(step=jnp.int32(0), params={"w": jnp.zeros(())}, opt_state=())
    for min_steps, stop, trend in ((0, 11, None), (25, 25, 0.0)):
        _, summary = run_loop(Run("flat", tmp_path / str(min_steps), 100, progress=False), state, flat_step,
                              DeviceFeed(make_iterator(ds, 1), lambda b: b), [Convergence(converged, min_steps)])
        # the loop reads step k's loss after dispatching step k+1: it runs one step past the rule
        assert (summary["end_step"], summary["converged_at"], summary["rule_met_at"]) == (stop + 1, stop, 11)
        assert summary["loss_trend"] == trend  # needs 20 steps


def _toy_loop(workdir, losses, num_steps, on_step=None, ckpt_every=100, hooks=(), step_fn=None, profile_steps=None):
    """run_loop over a toy state (w += batch): cheap, deterministic, checkpointable. ``step_fn``
    replaces the step whose loss is ``losses(step)``."""
    import grain

    from jaxseg.train.state import TrainState

    def toy_step(state, batch):
        k = int(state.step)
        if on_step is not None:
            on_step(k + 1)
        w = state.params["w"] + batch["x"]
        return state.replace(step=state.step + 1, params={"w": w}), {"loss": jnp.float32(losses(k + 1))}

    ds = grain.MapDataset.range(10_000).map(lambda k: {"x": np.full(3, k, np.float32)})
    state = TrainState(step=jnp.int32(0), params={"w": jnp.zeros(3)}, opt_state=())
    run = Run("toy", workdir, num_steps, ckpt_every, progress=False, profile_steps=profile_steps)
    return run_loop(run, state, step_fn or toy_step, DeviceFeed(make_iterator(ds, 1), lambda b: b), hooks)


@pytest.mark.parametrize("seed", range(4))
def test_async_loop_stops_at_most_one_step_after_the_synchronous_rule(tmp_path, seed):
    rng = np.random.default_rng(seed)
    seq = np.concatenate([np.linspace(2, 1, 15 + seed * 7), 1 + 0.004 * rng.standard_normal(60)])
    sync_stop = next(k for k in range(1, len(seq) + 1) if converged(list(seq[:k])))  # a loop that waits each step
    _, summary = _toy_loop(tmp_path, lambda k: seq[k - 1], 200, ckpt_every=1000, hooks=[Convergence(converged)])
    assert summary["rule_met_at"] == summary["converged_at"] == sync_stop
    assert summary["end_step"] - sync_stop in (0, 1)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, summary["end_step"] + 1))


def test_sigterm_checkpoints_stops_and_resumes_to_the_uninterrupted_result(tmp_path):
    import signal

    from jaxseg.distributed import Preempted

    losses = lambda k: 1.0 / k
    full, _ = _toy_loop(tmp_path / "full", losses, 9, ckpt_every=4)

    def term_at_5(k):
        if k == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="after step 5"):
        _toy_loop(tmp_path / "cut", losses, 9, on_step=term_at_5, ckpt_every=4)
    ckpt = Checkpointer(tmp_path / "cut" / "checkpoints")
    assert ckpt.latest_step() == 5  # written at the step in hand, not at the next periodic one (8)
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the loop's only while it runs
    resumed, summary = _toy_loop(tmp_path / "cut", losses, 9, ckpt_every=4)
    assert summary["start_step"] == 5 and int(resumed.step) == 9
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(full.params["w"]))
    rows = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 10))


def test_train_time_is_step_time_and_a_rerun_that_trains_nothing_adds_nothing(tmp_path):
    import time as _time

    slow_setup = lambda k: _time.sleep(1.0) if k == 1 else None  # the first step: 'compilation'
    _, first = _toy_loop(tmp_path, lambda k: 1.0, 6, on_step=slow_setup, ckpt_every=3)
    assert first["compile_s"] >= 0.9 > first["compile_s"] - 1.0  # the injected second, counted apart
    assert first["train_s"] < first["compile_s"]  # the other steps are near-instant
    _, again = _toy_loop(tmp_path, lambda k: 1.0, 6)
    assert again["start_step"] == again["end_step"] == 6
    assert again["train_s"] == pytest.approx(first["train_s"], abs=1e-9)


def test_loss_trend():
    from jaxseg.train.hooks import loss_trend

    assert loss_trend([1.0] * 19) is None
    assert loss_trend([2.0] * 10 + [1.0] * 10) == pytest.approx(-0.5)
    assert loss_trend([9.0] * 5 + [1.0] * 10 + [1.5] * 10) == pytest.approx(0.5)  # only the last 20 count


def _run(workdir, state, step, ds, num_steps, ckpt_every=2):
    mesh = data_mesh()
    return run_loop(Run("t", workdir, num_steps, ckpt_every, crops_per_step=4, progress=False),
                    replicate(state, mesh), step, DeviceFeed(make_iterator(ds, 2), functools.partial(shard_batch, mesh=mesh)))


def test_killed_and_resumed_run_equals_uninterrupted(cache, tmp_path):
    _, state0, step, ds = _setup(cache, CFG, "decoder")  # one step function (one compilation) for every run
    full, first = _run(tmp_path / "a", state0, step, ds, 5)
    # training time is reported without compilation, which is reported beside it
    assert first["compile_s"] > 0 and first["train_s"] <= first["wall_s"] - first["compile_s"] + 1e-6
    state0 = _setup(cache, CFG, "decoder")[1]
    _run(tmp_path / "b", state0, step, ds, 3)  # checkpoints at 2 and 3
    ckpt = Checkpointer(tmp_path / "b" / "checkpoints")
    ckpt.manager.delete(3)  # killed after step 3 ran but before it was saved
    _, saved = ckpt.restore(_setup(cache, CFG, "decoder")[1], None)
    ckpt.close()
    assert saved["train_s"] > 0
    fresh = _setup(cache, CFG, "decoder")[1]
    resumed, summary = _run(tmp_path / "b", fresh, step, ds, 5)
    assert summary["start_step"] == 2 and int(resumed.step) == 5
    assert summary["train_s"] > saved["train_s"]  # earlier runs' training time is carried over
    for k, v in _flat(full.params).items():
        np.testing.assert_array_equal(_flat(resumed.params)[k], v, err_msg=k)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    # step 3's row, logged before the kill, was dropped on resume: one row per step
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5]


def test_nan_loss_stops_and_keeps_last_checkpoint(cache, tmp_path):
    _, state, step, ds = _setup(cache, CFG, "encoder")

    def poisoned(state, batch):
        state, m = step(state, batch)
        return state, {"loss": jnp.where(state.step >= 3, jnp.nan, m["loss"])}

    with pytest.raises(NonFiniteLossError, match="at step 3.*checkpoint \\(step 2\\)"):
        _run(tmp_path, state, poisoned, ds, 6)
    _, template, _, _ = _setup(cache, CFG, "encoder")
    ckpt = Checkpointer(tmp_path / "checkpoints")
    restored, extra = ckpt.restore(template, None)
    ckpt.close()
    assert int(restored.step) == 2 and len(extra["history"]) == 2


def test_workdir_checks_and_params_round_trip(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder cannot be made under a file, whoever runs the test (root included)
    with pytest.raises(UserError, match="not writable"):
        check_workdir(blocker / "sub")
    with pytest.raises(UserError, match="MiB free"):
        check_workdir(tmp_path / "w", min_free_bytes=2**62)
    params = {"a": np.arange(3.0), "b": {"c": np.ones((2, 2))}}
    save_weights(tmp_path / "p.msgpack", params)
    back = load_weights(tmp_path / "p.msgpack", params)
    np.testing.assert_array_equal(back["b"]["c"], params["b"]["c"])
    assert not list(tmp_path.glob("*.tmp"))


def test_multi_device_matches_single_device(tmp_path):
    """Data-parallel over 4 CPU devices gives the same loss trajectory as 1 device."""
    script = f"""
import jax, numpy as np, jax.numpy as jnp
from jaxseg.config import get_config
from jaxseg.data import Cache, load_dataset_json, prepare, pretrain_dataset, write_phantom_dataset
from jaxseg.train.pretrain import make_pretrain_step, pretrain_state
from jaxseg.models import init_params
from jaxseg.workflow import make_model
from jaxseg.train.sharding import data_mesh, replicate, shard_batch
assert len(jax.devices()) == 4
d = write_phantom_dataset(r"{tmp_path}/data", "spleen", 3, shape=(32, 32, 20), seed=1, workers=1)
prepare(load_dataset_json(d), r"{tmp_path}/cache", progress=False, workers=1)
cache = Cache(r"{tmp_path}/cache")
cfg = get_config("tiny")
traj = []
for devices in (jax.devices()[:1], jax.devices()):
    mesh = data_mesh(devices)
    model = make_model(cfg, cache.task)
    state, tx = pretrain_state(model, init_params(model, cfg.seed), cfg, "encoder")  # sharding is the same for both stages
    state = replicate(state, mesh)
    step = make_pretrain_step(model, tx, cfg.pretrain, "encoder", False)
    ds = pretrain_dataset(cache, cache.training, cfg, seed=0)
    losses = []
    for k in range(3):
        batch = shard_batch(ds[k], mesh)
        if len(devices) == 4:
            assert len(batch["image"].sharding.device_set) == 4
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    traj.append(losses)
print("TRAJ", traj)
np.testing.assert_allclose(traj[1], traj[0], rtol=2e-5)
"""
    env = cpu_env(4)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TRAJ" in proc.stdout


def _data_files(step_dir: Path) -> list[Path]:
    """The state's data files (OCDBT keeps several; which one holds the arrays varies)."""
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


@pytest.mark.parametrize("damage", ["truncated", "metadata deleted", "garbage"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, damage, capfd):
    losses = lambda k: 1.0 / k
    full, _ = _toy_loop(tmp_path / "full", losses, 8, ckpt_every=2)
    _toy_loop(tmp_path / "cut", losses, 6, ckpt_every=2)  # keeps steps 4 and 6
    step6 = tmp_path / "cut" / "checkpoints" / "6"
    for i, data in enumerate(_data_files(step6)):
        if damage == "truncated":
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        elif damage == "garbage":
            data.write_bytes(np.random.default_rng(i).bytes(data.stat().st_size))
    if damage == "metadata deleted":
        (step6 / "state" / "_METADATA").unlink()
    resumed, summary = _toy_loop(tmp_path / "cut", losses, 8, ckpt_every=2)
    err = capfd.readouterr().err
    assert "checkpoint step 6 in" in err and "cannot be read" in err and "resuming from step 4" in err
    assert len([l for l in err.splitlines() if "cannot be read" in l]) == 1  # one line, no traceback
    assert summary["start_step"] == 4 and int(resumed.step) == 8
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(full.params["w"]))
    assert len(list((tmp_path / "cut" / "checkpoints").glob("damaged-6-*"))) == 1  # set aside, never deleted


def test_no_readable_checkpoint_is_one_error_naming_the_folder(tmp_path):
    _toy_loop(tmp_path, lambda k: 1.0, 4, ckpt_every=2)
    for step in (2, 4):
        (tmp_path / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    with pytest.raises(UserError, match=f"{tmp_path / 'checkpoints'}: no readable checkpoint \\(steps 4, 2"):
        _toy_loop(tmp_path, lambda k: 1.0, 6, ckpt_every=2)


def test_a_checkpoint_keeps_the_input_position_in_its_json_not_in_per_process_files(tmp_path):
    _toy_loop(tmp_path, lambda k: 1.0, 3, ckpt_every=2)
    step = tmp_path / "checkpoints" / "3"
    assert json.loads((step / "extra" / "metadata").read_text())["input"] == {"next_index": 3}
    assert not (step / "data").exists()


def test_orbax_is_handed_the_replicated_state_as_numpy_and_restores_it_onto_the_devices(tmp_path):
    """The train state is fetched from one replica and written as NumPy (handed jax arrays, orbax
    compiles a slicing program per array shape); a restore still gives jax arrays laid out as
    the template, with the saved values."""
    from jaxseg.train.state import TrainState

    mesh = data_mesh()
    state = replicate(TrainState(step=jnp.int32(7), params={"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4)},
                                 opt_state=()), mesh)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(7, state, None, {"history": [1.0]})
    ckpt.wait()
    meta = json.loads((tmp_path / "checkpoints" / "7" / "state" / "_METADATA").read_text())["tree_metadata"]
    assert {m["value_metadata"]["value_type"] for m in meta.values() if not m["value_metadata"]["skip_deserialize"]} == {
        "np.ndarray"}
    template = jax.tree_util.tree_map(jnp.zeros_like, state)
    restored, extra = ckpt.restore(template, None)
    ckpt.close()
    assert extra["history"] == [1.0] and int(restored.step) == 7
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        assert isinstance(got, jax.Array) and got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_save_is_written_in_the_background_and_its_fault_is_named_where_it_is_waited_for(tmp_path, monkeypatch):
    """``save`` returns while the write is still running (the loop trains on); the host copy it
    hands over is its own, not a view of the device buffer the next step is given; ``wait``,
    ``latest_step`` and ``close`` wait for the write, and a fault the write met is raised there,
    naming the step it was writing and the last good one."""
    import errno
    import threading

    from jaxseg.train.state import TrainState

    state = TrainState(step=jnp.int32(1), params={"w": jnp.arange(6.0)}, opt_state=())
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt._writer is not None  # one process: in the background by default
    release, written = threading.Event(), []
    write = Checkpointer._write

    def held_write(self, step, items, last):
        assert release.wait(60)
        written.append(items["state"].item.params["w"])
        write(self, step, items, last)

    monkeypatch.setattr(Checkpointer, "_write", held_write)
    history = [0.5]
    ckpt.save(1, state, None, {"history": history})
    assert ckpt._pending is not None and not ckpt._pending.done()  # returned before the write
    history.append(0.4)  # the loop goes on logging losses while the write waits
    release.set()
    assert ckpt.latest_step() == 1 and written[0].flags.owndata  # waited for; a copy of its own
    np.testing.assert_array_equal(written[0], np.arange(6.0))
    assert ckpt.restore(state, None)[1]["history"] == [0.5]  # the history as it was at step 1

    def no_space(self, step, items, last):
        raise UserError(f"{self.directory}: the disk is full while saving the checkpoint of step {step}; "
                        f"the last good checkpoint is step {last}")

    monkeypatch.setattr(Checkpointer, "_write", no_space)
    ckpt.save(2, state.replace(step=jnp.int32(2)), None, {"history": []})  # the fault comes in the background
    with pytest.raises(UserError, match="step 2; the last good checkpoint is step 1"):
        ckpt.save(3, state.replace(step=jnp.int32(3)), None, {"history": []})  # ... and is raised at the next save
    monkeypatch.setattr(Checkpointer, "_write", write)
    ckpt.save(3, state.replace(step=jnp.int32(3)), None, {"history": []})
    ckpt.close()  # waits: step 3 is on disk when close returns
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 3]
    ckpt = Checkpointer(tmp_path / "checkpoints")
    monkeypatch.setattr(Checkpointer, "_write", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))  # not a disk fault of the work dir: raised as it is, at close
    ckpt.save(4, state, None, {"history": []})
    with pytest.raises(OSError, match="Input/output error"):
        ckpt.close()


def test_closed_event_loop_noise_is_dropped_from_both_hooks_and_nothing_else(monkeypatch):
    """tensorstore's late callbacks into loops orbax closed after a failed save or restore reach
    sys.excepthook, or sys.unraisablehook from a C++ thread (seen: a warning in the suite after a
    damaged checkpoint); other errors go on to the hooks that were there."""
    import types

    from jaxseg.train.checkpoint import _drop_closed_loop_noise

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(("except", str(value))))
    monkeypatch.setattr(sys, "unraisablehook", lambda args: seen.append(("unraisable", str(args.exc_value))))
    _drop_closed_loop_noise()
    _drop_closed_loop_noise()  # once: not wrapped twice
    for value in (RuntimeError("Event loop is closed"), RuntimeError("boom"), ValueError("Event loop is closed")):
        sys.excepthook(type(value), value, None)
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(value), exc_value=value, exc_traceback=None,
                                                 err_msg=None, object=None))
    assert seen == [("except", "boom"), ("unraisable", "boom"), ("except", "Event loop is closed"),
                    ("unraisable", "Event loop is closed")]


def test_orbax_is_muted_during_a_write_and_nothing_else(caplog):
    """A write silences orbax's own records (a failed save logs its traceback) but not the absl
    messages of other code running meanwhile (grain's, on the main thread)."""
    import logging

    from jaxseg.train.checkpoint import _quiet_orbax

    logger = logging.getLogger("absl")
    as_orbax = compile("logger.error('from orbax')", os.path.join("x", "orbax", "checkpoint", "m.py"), "exec")
    with caplog.at_level(logging.INFO, logger="absl"):
        with _quiet_orbax(), _quiet_orbax():  # two writes at once
            exec(as_orbax, {"logger": logger})
            logger.warning("from elsewhere")
        exec(as_orbax, {"logger": logger})  # after the writes: orbax heard again
    assert [r.getMessage() for r in caplog.records] == ["from elsewhere", "from orbax"]


def test_a_second_sigterm_during_the_preemption_save_still_leaves_it_on_disk(tmp_path):
    """The checkpoint a preemption writes is on disk before the loop gives SIGTERM back: a second
    SIGTERM (schedulers repeat it) arriving during that write must not kill the process first."""
    script = f"""
import os, signal, time
from pathlib import Path
from jaxseg.distributed import Preempted
from jaxseg.train.checkpoint import Checkpointer
from tests.train.test_train import _toy_loop

write = Checkpointer._write
def slow_write(self, step, items, last):
    if step == 5:  # the second notice, while the preemption save is written
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
    write(self, step, items, last)
Checkpointer._write = slow_write

def term_at_5(k):
    if k == 5:
        os.kill(os.getpid(), signal.SIGTERM)
try:
    _toy_loop(Path(r"{tmp_path}"), lambda k: 1.0, 9, on_step=term_at_5, ckpt_every=100)
except Preempted as e:
    print("preempted:", e)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cpu_env(1), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "preempted: " in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "5").is_dir()


def _fill_disk_run(workdir):
    """A toy run whose checkpoints (1.6 MB each) outgrow a 3 MB disk at the second save."""
    import grain

    from jaxseg.train.state import TrainState

    def step_fn(state, batch):
        return state.replace(step=state.step + 1, params={"w": state.params["w"] + 1}), {"loss": jnp.float32(1.0)}

    ds = grain.MapDataset.range(100).map(lambda k: {"x": np.zeros(1, np.float32)})
    w = jnp.asarray(np.random.default_rng(0).random(400_000, np.float32))
    return run_loop(Run("fill", workdir, 20, ckpt_every=1, progress=False),
                    TrainState(step=jnp.int32(0), params={"w": w}, opt_state=()), step_fn,
                    DeviceFeed(make_iterator(ds, 1), lambda b: b))


def test_a_disk_that_fills_during_training_is_named_in_one_line(tmp_path):
    """On a real 3 MB tmpfs (the suite runs as root, as CI does)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(UserError) as e:
            _fill_disk_run(mnt / "w")
        msg = str(e.value)
        assert msg.startswith(f"{mnt / 'w'}") and "the disk is full" in msg and "last good checkpoint is step" in msg
        assert "\n" not in msg
        assert not list((mnt / "w" / "checkpoints").glob("*orbax-checkpoint-tmp*"))  # temporaries removed
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_read_only_work_dir_during_training_is_named(tmp_path, monkeypatch):
    import errno

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "checkpoints"))

    monkeypatch.setattr(Checkpointer, "save", read_only)
    with pytest.raises(UserError, match="the file system is read-only .*last good checkpoint is none"):
        _toy_loop(tmp_path, lambda k: 1.0, 3, ckpt_every=1)


def _remove_tree(folder):
    """``rm -rf`` as a user runs it beside a live run: a background save may be creating files in
    it meanwhile (then one pass fails with "Directory not empty"), so go on until it is gone."""
    import shutil

    for _ in range(100):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.01)
    raise AssertionError(f"{folder} could not be removed")


@pytest.mark.parametrize("when", ["between saves", "during a save"])
def test_a_work_dir_that_vanishes_during_training_is_named(tmp_path, monkeypatch, when):
    """orbax would make the checkpoint folder anew (and the metrics written so far are gone):
    the run stops at its next checkpoint, in one line, whether the folder went between two saves
    or while one was being written (orbax makes the folders anew)."""
    import orbax.checkpoint as ocp

    workdir = tmp_path / "w"

    def vanish(k):
        if k == 3 and when == "between saves":
            _remove_tree(workdir)

    save = ocp.CheckpointManager.save

    def save_into_a_vanishing_folder(self, step, *a, **k):
        if step == 2 and when == "during a save":
            _remove_tree(workdir)
        return save(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_into_a_vanishing_folder)
    with pytest.raises(UserError) as e:
        _toy_loop(workdir, lambda k: 1.0, 6, on_step=vanish, ckpt_every=2)
    msg = str(e.value)
    assert msg.startswith(f"{workdir}: the folder vanished during training") and "\n" not in msg


@pytest.mark.parametrize("error", ["OSError", "orbax's own"])
@pytest.mark.parametrize("background", [True, False])
def test_a_save_that_fails_because_the_work_dir_vanished_says_so(tmp_path, background, error):
    """The write itself fails (orbax's temporary folder went under it): the same line as a
    folder found gone between saves, in the background and in a multi-process (in-line) save,
    whether orbax passes the OS error on or raises its own."""
    import errno

    from jaxseg.train.state import TrainState

    workdir = tmp_path / "w"
    state = TrainState(step=jnp.int32(1), params={"w": jnp.arange(6.0)}, opt_state=())
    ckpt = Checkpointer(workdir / "checkpoints", background=background)
    ckpt.save(1, state, None, {})
    ckpt.wait()

    def vanish_under_the_save(step, *a, **k):
        workdir.rename(tmp_path / "moved")  # moved away, and both folders made anew (as orbax's create=True
        ckpt.directory.mkdir(parents=True)  # would): new inodes, the old ones still in use
        if error == "OSError":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(ckpt.directory / "2.tmp"))
        raise ValueError("Failed to finalize the checkpoint")

    ckpt.manager.save = vanish_under_the_save
    with pytest.raises(UserError) as e:
        ckpt.save(2, state, None, {})
        ckpt.wait()
    msg = str(e.value)
    assert msg.startswith(str(workdir)) and ": the folder vanished during training" in msg and "\n" not in msg


@pytest.mark.parametrize("damage", ["two bytes flipped", "truncated", "garbage", "empty"])
def test_a_damaged_weights_file_is_refused_naming_it(tmp_path, damage):
    from jaxseg.io import WeightsError

    params = {"a": np.arange(1000.0, dtype=np.float32), "b": {"c": np.ones((20, 20), np.float32)}}
    path = tmp_path / "params.msgpack"
    save_weights(path, params)
    data = bytearray(path.read_bytes())
    if damage == "two bytes flipped":
        for i in (len(data) // 2, len(data) // 2 + 7):
            data[i] ^= 0xFF
    elif damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "garbage":
        data = bytearray(np.random.default_rng(1).bytes(len(data)))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=f"^{path}: (checksum mismatch|damaged)") as e:
        load_weights(path, params)
    assert "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="made for another model"):
        save_weights(path, params)
        load_weights(path, {"a": np.zeros(3, np.float32)})


def test_a_sampled_objective_takes_its_triplets_from_the_pipeline(cache):
    """The jitted step draws nothing: its loss equals the objective evaluated directly on the
    slices with the batch's triplets."""
    from jaxseg import losses as L
    from jaxseg.train.pretrain import axis_loss, stage_features

    cfg = CFG.replace(objective="comparative_sampled", sampled_triplets=16, axis_mode="joint")
    spec = cfg.pretrain
    model = make_model(cfg, cache.task)
    params = init_params(model, cfg.seed)
    ds = pretrain_dataset(cache, cache.training, cfg, seed=0)
    batch = {k: jnp.asarray(v) for k, v in ds[2].items()}
    feats = stage_features(model, params, batch["image"], "encoder", "probs", False)
    for a in range(3):
        size = L.partition_size(feats.shape[1 + a], 4)
        offsets = jnp.minimum((batch["offset_u"][a] * size).astype(jnp.int32), size - 1)
        want = L.comparative_sampled(L.partition_slices(feats, a, offsets), batch["triplets"][a], cfg.pretrain.temperature)
        np.testing.assert_allclose(float(axis_loss(feats, a, batch["offset_u"][a], batch["triplets"][a], spec)),
                                   float(want), rtol=1e-6)
    state, tx = pretrain_state(model, params, cfg, "encoder")
    step = make_pretrain_step(model, tx, spec, "encoder", False)
    _, m = step(state, batch)
    assert np.isfinite(float(m["loss"]))
    with pytest.raises(ValueError, match="needs the batch's 'triplets'"):
        step(state, {k: v for k, v in batch.items() if k != "triplets"})


def test_best_model_keeps_the_highest_score_across_a_resume(tmp_path):
    """A score that does not beat the best (or NaN) keeps the old weights; a resumed run reads
    the best so far from its folder and goes on comparing against it."""
    from jaxseg.train.best import BestModel

    best = BestModel(tmp_path)
    assert best.offer(0.3, 10, {"w": np.ones(2, np.float32)}) and not best.offer(0.2, 20, {"w": np.zeros(2, np.float32)})
    assert not best.offer(float("nan"), 30, {"w": np.zeros(2, np.float32)})
    again = BestModel(tmp_path)  # after a restart
    assert again.best == {"val_dice": 0.3, "step": 10}
    assert not again.offer(0.25, 40, {"w": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(again.load({"w": np.zeros(2, np.float32)})["w"], [1, 1])
    again.finish({"w": np.zeros(2, np.float32)})  # something was kept: finish leaves it
    np.testing.assert_array_equal(again.load({"w": np.zeros(2, np.float32)})["w"], [1, 1])
    fresh = BestModel(tmp_path / "none")
    (tmp_path / "none").mkdir()
    fresh.finish({"w": np.full(2, 5, np.float32)})  # no validation: the final params
    np.testing.assert_array_equal(fresh.load({"w": np.zeros(2, np.float32)})["w"], [5, 5])


def test_early_stopping_after_patience_evaluations_without_a_better_score(tmp_path):
    """Validation scores rise to step 4, then stay below it: with a patience of 2 evaluations
    every 2 steps the run stops at step 8 (4 + 2 x 2), keeps step 4's weights, and a rerun of the
    stopped run trains nothing."""
    from jaxseg.train.best import BestModel
    from jaxseg.train.hooks import Evaluate, Evaluation, KeepBest

    scores = {2: 0.2, 4: 0.5, 6: 0.4, 8: 0.45, 10: 0.9}

    def hooks():
        best = BestModel(tmp_path)
        return [Evaluate(lambda state, k: Evaluation({"val_dice": scores[k]}), 2, 12),
                KeepBest(best, "val_dice", patience=2, every=2)], best

    hk, best = hooks()
    state, summary = _toy_loop(tmp_path, lambda k: 1.0, 12, ckpt_every=100, hooks=hk)
    assert summary["end_step"] == int(state.step) == 8 and summary["early_stopped_at"] == 8
    assert summary["stopped"] == "no better val_dice in 2 evaluations" and summary["best"] == {"val_dice": 0.5, "step": 4}
    np.testing.assert_array_equal(best.load(state.params)["w"], np.full(3, sum(range(4)), np.float32))  # w after 4 steps
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and [r.get("val_dice") for r in rows][1::2] == [0.2, 0.5, 0.4, 0.45]
    hk, _ = hooks()
    _, again = _toy_loop(tmp_path, lambda k: 1.0, 12, ckpt_every=100, hooks=hk)
    assert again["start_step"] == again["end_step"] == 8  # stopped for good, not resumed to 12


def test_dropout_is_on_in_training_steps_keyed_by_the_step_and_off_in_evaluation(cache):
    from jaxseg.data import finetune_dataset
    from jaxseg.inference import make_predictor
    from jaxseg.losses import dice_ce_loss
    from jaxseg.train.finetune import make_finetune_step
    from jaxseg.train.state import create_state, make_optimizer

    cfg = CFG.replace(dropout_rate=0.3)
    ds = finetune_dataset(cache, cache.training[:2], cfg, seed=3)
    assert "rng" in ds[0] and "rng" not in finetune_dataset(cache, cache.training[:2], CFG, seed=3)[0]
    np.testing.assert_array_equal(ds[5]["rng"], finetune_dataset(cache, cache.training[:2], cfg, seed=3)[5]["rng"])
    on, off = make_model(cfg, cache.task), make_model(CFG, cache.task)
    params, tx = init_params(off, 0), make_optimizer(1e-3, 0.0)
    step = make_finetune_step(on, tx, False)
    batch = {k: jnp.asarray(v) for k, v in ds[0].items()}
    losses = [float(step(create_state(jax.tree_util.tree_map(jnp.array, params), tx), batch)[1]["loss"])
              for _ in range(2)]  # (the step donates its state: a fresh copy each time)
    plain = float(dice_ce_loss(jax.jit(off.apply)(params, batch["image"]), batch["label"], "softmax"))
    assert losses[0] == losses[1] != pytest.approx(plain, rel=1e-4)  # on in training, a function of (seed, step)
    image = np.asarray(cache.image(cache.training[0]))
    probs = [np.asarray(make_predictor(m, cache.task, 32)(params, image)) for m in (on, on, off)]
    np.testing.assert_array_equal(probs[0], probs[1])  # evaluation is deterministic
    np.testing.assert_array_equal(probs[0], probs[2])  # and has no dropout


def test_profile_steps_write_a_jax_profiler_trace_of_those_steps(tmp_path):
    from jaxseg.config import get_config, profile_range
    from jaxseg.errors import UserError

    _, summary = _loop_with_profile(tmp_path / "plain", 6, None)
    assert "profile" not in summary and not (tmp_path / "plain" / "profile").exists()  # off by default
    _, summary = _loop_with_profile(tmp_path / "traced", 6, (3, 4))
    (trace,) = (tmp_path / "traced" / "profile").rglob("*.xplane.pb")  # what TensorBoard's profile plugin reads
    assert summary["profile"] == str(tmp_path / "traced" / "profile")
    assert b"profiled_toy_step" in trace.read_bytes()  # the step's program ran inside the trace
    # a run cut after step 2 and resumed inside the range traces its remaining steps
    _, summary = _loop_with_profile(tmp_path / "resumed", 2, (3, 5), ckpt_every=2)
    assert "profile" not in summary and not (tmp_path / "resumed" / "profile").exists()  # it ended at step 2
    _, summary = _loop_with_profile(tmp_path / "resumed", 6, (3, 5))
    assert summary["start_step"] == 2 and "profile" in summary
    assert len(list((tmp_path / "resumed" / "profile").rglob("*.xplane.pb"))) == 1
    assert profile_range("") is None and profile_range("2:5") == (2, 5)
    for bad in ("1:3", "5:4", "3", "a:b"):
        with pytest.raises(UserError, match="profile_steps"):
            get_config("tiny", profile_steps=bad)


def _loop_with_profile(workdir, num_steps, steps, ckpt_every=100):
    """``_toy_loop`` with a jitted step whose name the trace must hold."""
    @jax.jit
    def profiled_toy_step(state, batch):
        w = state.params["w"] + batch["x"]
        return state.replace(step=state.step + 1, params={"w": w}), {"loss": jnp.sum(w)}

    return _toy_loop(workdir, None, num_steps, ckpt_every=ckpt_every, step_fn=profiled_toy_step, profile_steps=steps)
