"""Training steps that the end-to-end runs do not cover: a multi-label (BraTS-style) fine-tuning
step, a bfloat16 training step, stage-2 pre-training on logits. One tiny BraTS-shaped model at
16^3 (4 input channels, 3 nested regions) shared by the three, so that each compiles one step;
the losses themselves are checked against NumPy and MONAI in tests/losses/."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg.data.preprocess import label_channels
from jaxseg.losses import dice_ce_loss
from jaxseg.models import init_params
from jaxseg.models.unetr import unetr_from_preset
from jaxseg.train.finetune import make_finetune_step
from jaxseg.train.state import create_state

SIZE = (16, 16, 16)
BRATS_REGIONS = {"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]}  # MSD Task01's label values 1-3 as nested regions
MODEL = unetr_from_preset("tiny", in_channels=4, out_channels=3, img_size=SIZE)
APPLY = jax.jit(MODEL.apply)
TX = optax.adam(3e-3)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, 0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, *SIZE, 4)).astype(np.float32)  # FLAIR, T1w, T1gd, T2w
    label = np.zeros((2, *SIZE), np.uint8)
    label[:, 4:12, 4:12, 4:12] = 1  # oedema around a core with an enhancing centre
    label[:, 6:10, 6:10, 6:10] = 2
    label[:, 7:9, 7:9, 7:9] = 3
    image[..., 0] += 2.0 * (label > 0)  # a signal the model can learn
    return {"image": jnp.asarray(image), "label": jnp.asarray(label_channels(label, BRATS_REGIONS))}


def _fresh(tree):
    return jax.tree_util.tree_map(jnp.array, tree)  # steps donate their state: a copy per use


def test_a_multi_label_finetune_step_is_sigmoid_dice_ce_over_overlapping_regions(params, batch):
    assert batch["label"].shape == (2, *SIZE, 3)
    tc, wt, et = (int(batch["label"][..., k].sum()) for k in range(3))
    assert wt > tc > et > 0  # nested: WT contains TC contains ET
    logits = APPLY(params, batch["image"])
    sigmoid, softmax = (float(dice_ce_loss(logits, batch["label"], mode)) for mode in ("sigmoid", "softmax"))
    step = make_finetune_step(MODEL, TX, True)
    state, losses = create_state(_fresh(params), TX), []
    for _ in range(6):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(sigmoid, rel=1e-5) and sigmoid != pytest.approx(softmax, rel=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses  # it learns the regions
    moved = np.asarray(state.params["params"]["out"]["kernel"]) - np.asarray(params["params"]["out"]["kernel"])
    assert all(np.abs(moved[..., k]).max() > 0 for k in range(3))  # every region's output channel is trained


def test_a_bfloat16_training_step_follows_the_float32_one_and_keeps_float32_state(params, batch):
    """bfloat16 compute (the GPU setting): weights, optimiser state and loss stay float32; the loss
    matches the float32 step's to bfloat16's precision and the update points the same way (Adam's
    first update is lr x the gradient's sign, so: the signs agree)."""
    bf16 = unetr_from_preset("tiny", in_channels=4, out_channels=3, img_size=SIZE, dtype=jnp.bfloat16)
    state = create_state(params, TX)
    (s32, m32), (s16, m16) = (make_finetune_step(model, TX, True)(_fresh(state), batch) for model in (MODEL, bf16))
    assert m16["loss"].dtype == jnp.float32 and np.isfinite(float(m16["loss"]))
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    floats = [leaf for leaf in jax.tree_util.tree_leaves(s16) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floats and all(leaf.dtype == jnp.float32 for leaf in floats)
    d32, d16 = (np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in
                                zip(jax.tree_util.tree_leaves(s.params), jax.tree_util.tree_leaves(params))])
                for s in (s32, s16))
    moved = np.abs(d32) > 1e-4
    assert moved.mean() > 0.5 and np.mean(np.sign(d16[moved]) == np.sign(d32[moved])) > 0.9


def test_stage_2_on_logits_pretrains_on_the_raw_decoder_output(params, batch):
    """``stage2_output='logits'`` (the authors' code): the decoder stage's objective sees the
    logits, not the region probabilities (sigmoid here) of the paper."""
    from jaxseg.config import get_config
    from jaxseg.train.pretrain import axis_loss, make_pretrain_step

    spec = get_config("tiny", stage2_output="logits", objective="contrastive").pretrain
    rng = np.random.default_rng(2)
    pbatch = {"image": batch["image"], "offset_u": jnp.asarray(rng.uniform(size=(3, spec.num_partitions)), jnp.float32)}
    logits = APPLY(params, pbatch["image"])
    on = {out: float(axis_loss(f, 0, pbatch["offset_u"][0], None, spec))
          for out, f in (("logits", logits), ("probs", jax.nn.sigmoid(logits)))}
    sgd = optax.sgd(0.1)
    _, m = make_pretrain_step(MODEL, sgd, spec, "decoder", multilabel=True)(create_state(_fresh(params), sgd), pbatch)
    # axis 0 is updated first, from the parameters given
    assert float(m["loss_axis0"]) == pytest.approx(on["logits"], abs=1e-5)
    assert abs(on["logits"] - on["probs"]) > 1e-3, on
    assert np.isfinite([float(m[f"loss_axis{a}"]) for a in range(3)]).all()
