"""Train state, AdamW with truly frozen parameters, and which parameters each stage trains."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


def param_labels(params: Any, trainable: Callable[[tuple[str, ...]], bool]) -> Any:
    """'train' / 'frozen' for every leaf, from a predicate on its path of module names."""
    def label(path, _):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        return "train" if trainable(names) else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(lr: float = 1e-4, weight_decay: float = 1e-5, labels: Any = None) -> optax.GradientTransformation:
    """AdamW; with ``labels``, leaves labelled 'frozen' get ``set_to_zero`` updates, so neither
    momentum nor weight decay moves them (the authors' frozen weights drifted under AdamW)."""
    adamw = optax.adamw(lr, weight_decay=weight_decay)
    if labels is None:
        return adamw
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def stage_trainable(stage: str, num_layers: int, freeze_encoder: bool = False) -> Callable[[tuple[str, ...]], bool]:
    """stage 'feat': patch embedding, the ViT blocks up to the enc4 skip, encoder4 (all that
    enc4 depends on). stage 'recon': everything (the paper) or, with ``freeze_encoder``, the
    decoder and output head only (the authors' code). Fine-tuning trains everything (no labels)."""
    from jaxseg.models.unetr import skip_layers

    last = skip_layers(num_layers)[2]
    decoder = {"decoder5", "decoder4", "decoder3", "decoder2", "out"}

    def feat(path):
        top = path[1] if path and path[0] == "params" else path[0]
        if top == "encoder4":
            return True
        if top == "vit":
            sub = path[path.index("vit") + 1]
            return sub == "patch_embedding" or (sub.startswith("blocks_") and int(sub.split("_")[1]) <= last)
        return False

    def recon(path):
        top = path[1] if path and path[0] == "params" else path[0]
        return top in decoder if freeze_encoder else True

    if stage == "feat":
        return feat
    if stage == "recon":
        return recon
    raise ValueError(f"unknown stage {stage!r}")


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
