"""The nested config: groups, flat names (flags, settings.json, replace), derived data configs."""

import dataclasses

import pytest

from jaxseg.config import FLAT_NAMES, GROUPS, PRESETS, Config, get_config, job_settings
from jaxseg.errors import UserError


def test_every_group_field_has_one_flat_name_and_round_trips():
    leaves = [(g, f.name) for g, cls in GROUPS.items() for f in dataclasses.fields(cls)]
    assert sorted(v for v in FLAT_NAMES.values() if len(v) == 2) == sorted(leaves)  # each leaf once
    cfg = get_config("small")
    flat = cfg.flat()
    assert Config.from_flat(**flat) == cfg
    for name, path in FLAT_NAMES.items():
        node = cfg
        for part in path:
            node = getattr(node, part)
        assert node == flat[name]


def test_replace_by_flat_name_touches_one_group():
    cfg = get_config("tiny")
    new = cfg.replace(objective="contrastive", finetune_steps=7, data_seed=3, lr=0.5)
    assert (new.pretrain.objective, new.finetune.steps, new.data.seed, new.lr) == ("contrastive", 7, 3, 0.5)
    assert new.model is cfg.model and new.eval is cfg.eval  # untouched groups are shared
    with pytest.raises(UserError, match=r"unknown setting\(s\) \['steps'\]"):
        cfg.replace(steps=3)
    with pytest.raises(UserError, match="crop_size must be a multiple of 16"):
        cfg.replace(crop_size=40)


def test_every_setting_has_one_home_and_one_flat_name():
    cfg = PRESETS["small"]
    assert (cfg.model.crop_size, cfg.pretrain.volumes_per_step, cfg.pretrain.crops_per_volume) == (32, 2, 1)
    assert cfg.prepare().target_spacing == cfg.data.target_spacing == (3.0, 3.0, 3.0)
    aug = cfg.replace(pretrain_flip_prob=0.3, finetune_flip_prob=0.5, pretrain_augment="per_step", patience=3,
                      dropout_rate=0.1, pos_fraction=0.7)
    assert (aug.pretrain.flip_prob, aug.finetune.flip_prob, aug.pretrain.augment) == (0.3, 0.5, "per_step")
    assert (aug.finetune.patience, aug.model.dropout_rate, aug.finetune.pos_fraction) == (3, 0.1, 0.7)
    assert len(set(FLAT_NAMES.values())) == len(FLAT_NAMES)  # one flat name per field
    for bad in (dict(pretrain_flip_prob=1.5), dict(dropout_rate=-0.1), dict(patience=-1),
                dict(pretrain_augment="sometimes")):
        with pytest.raises(UserError):
            cfg.replace(**bad)
    s = job_settings(cfg, "finetune")
    assert s["finetune_steps"] == 150 and s["model"] == "small" and "objective" not in s  # as before nesting


def test_gpu_preset_is_the_paper_protocol_at_its_shapes():
    gpu, small = PRESETS["gpu"], PRESETS["small"]
    assert (gpu.model.size, gpu.model.crop_size, gpu.model.dtype) == ("paper", 96, "bfloat16")
    assert (gpu.pretrain.axis_mode, gpu.pretrain.volumes_per_step, gpu.pretrain.crops_per_volume) == ("sequential", 2, 2)
    assert (gpu.lr, gpu.pretrain.temperature, gpu.pretrain.num_partitions) == (1e-4, 1.0, 4)  # the paper's
    # the crop holds the whole phantom at 1 mm, as small's 32^3 crop does at 3 mm
    assert gpu.model.crop_size * gpu.data.target_spacing[0] == small.model.crop_size * small.data.target_spacing[0]


def test_small_long_preset_gives_the_vit_a_real_token_grid():
    """small_long: small at twice the resolution over the same field of view. Its ViT sees a
    4 x 4 x 4 grid of 64 tokens (small: 2 x 2 x 2 = 8), and each stage-1 partition of the enc4
    map is a 2-slice slab of an 8 x 8 face (small: one 4 x 4 slice)."""
    import jax
    import jax.numpy as jnp

    from jaxseg.losses import partition_size
    from jaxseg.models import unetr_from_preset
    from jaxseg.models.unetr import UNETR

    long, small = PRESETS["small_long"], PRESETS["small"]
    assert long.model.crop_size * long.data.target_spacing[0] == small.model.crop_size * small.data.target_spacing[0]
    # nothing else differs but how long fine-tuning may run (stopped on validation Dice)
    assert long.replace(crop_size=32, target_spacing=3.0, finetune_steps=150, patience=0) == small
    assert (long.finetune.steps, long.finetune.patience) == (600, 3)
    for cfg, tokens, enc4 in ((long, 4, 8), (small, 2, 4)):
        model = unetr_from_preset(cfg.model.size, in_channels=1, out_channels=2, img_size=cfg.model.crop_size)
        x = jax.ShapeDtypeStruct((1, *(cfg.model.crop_size,) * 3, 1), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.key(0), x)
        grid = cfg.model.crop_size // model.patch_size
        assert grid == tokens and params["params"]["vit"]["patch_embedding"]["position_embeddings"].shape[1] == tokens ** 3
        feats = jax.eval_shape(lambda p, v: model.apply(p, v, method=UNETR.encode), params, x)
        assert feats.shape[1:4] == (enc4,) * 3
        assert partition_size(enc4, cfg.pretrain.num_partitions) == enc4 // 4
