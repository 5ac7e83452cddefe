"""Did pre-training learn anatomy? A linear probe and a collapse check on enc4 slice features.

Pre-training asks slices from the same partition of different images to look alike. The probe
asks the converse of the learned features: from the pooled enc4 features of one slice, can a
linear classifier tell which of the P partitions (per axis) the slice came from? It is fitted on
crops of the training volumes and scored on held-out volumes (never seen in pre-training), for
two labellings:

- ``crop``: the partition within the crop, as the objective defines it. The ViT's position
  embedding alone can carry this, so random init already scores well above chance 1/P;
- ``anatomy``: the partition of the whole (foreground-cropped) volume that the slice's centre
  lies in. Probe crops are centred anywhere in the volume (zero-padded outside it), so the
  position in the crop says little about the position in the body: a gain over random init
  means the features encode where in the body a slice is. Slices outside the volume are left
  out of this labelling.

Collapse: the objectives are minimised trivially by features that ignore the input; the mean
pairwise cosine of the (L2-normalised) slice features tends to 1 and their per-dimension spread
to 0 when that happens.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jaxseg.data.augment import crop_at
from jaxseg.data.cache import Cache


def probe_crops(cache: Cache, case_ids: Sequence[str], crop_size: int, per_case: int, seed: int):
    """``per_case`` crops of each case centred at uniform positions in the volume, the same for
    every model compared: images ``(N, S, S, S, C)``, starts ``(N, 3)`` (negative: padding) and
    the volume shapes ``(N, 3)``."""
    rng = np.random.default_rng(seed)
    size = (crop_size,) * 3
    images, starts, shapes = [], [], []
    for cid in case_ids:
        img = cache.image(cid)
        for _ in range(per_case):
            start = [int(rng.integers(0, n + 1)) - crop_size // 2 for n in img.shape[:3]]
            images.append(crop_at(img, start, size))
            starts.append(start)
            shapes.append(img.shape[:3])
    return np.stack(images).astype(np.float32), np.asarray(starts), np.asarray(shapes)


def pooled_slices(feats: np.ndarray) -> np.ndarray:
    """``(N, s, s, s, C)`` -> ``(N, 3, s, C)``: each slice along each axis averaged over the
    other two spatial axes."""
    return np.stack([feats.mean(axis=(2, 3)), feats.mean(axis=(1, 3)), feats.mean(axis=(1, 2))], axis=1)


def partition_labels(grid: int, crop_size: int, num_partitions: int, starts: np.ndarray,
                     shapes: np.ndarray) -> dict[str, np.ndarray]:
    """Labels ``(N, 3, grid)`` of each feature slice: its partition in the crop, and the
    partition of the whole volume that its centre voxel lies in (-1: outside the volume)."""
    t = np.arange(grid)
    crop = np.broadcast_to(np.minimum(t * num_partitions // grid, num_partitions - 1),
                           (len(starts), 3, grid))
    centre = starts[:, :, None] + (t + 0.5) * (crop_size / grid)  # voxel coordinate in the volume
    inside = (centre >= 0) & (centre < shapes[:, :, None])
    anatomy = np.where(inside, np.clip(np.floor(centre / shapes[:, :, None] * num_partitions).astype(int), 0,
                                       num_partitions - 1), -1)
    return {"crop": crop, "anatomy": anatomy}


def probe_accuracy(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   num_classes: int, l2: float = 1e-3, max_iter: int = 500) -> float:
    """Accuracy on ``x_test`` of a multinomial logistic regression (L-BFGS on cross-entropy plus
    ``l2`` x squared weights) fitted on standardised ``x_fit`` (rows are samples). Deterministic."""
    from scipy.optimize import minimize

    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    a = np.concatenate([(x_fit - mean) / std, np.ones((len(x_fit), 1))], 1).astype(np.float64)
    onehot = np.eye(num_classes)[y_fit]
    shape = (a.shape[1], num_classes)

    def loss_grad(w_flat):
        w = w_flat.reshape(shape)
        z = a @ w
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        reg = w[:-1]  # no penalty on the bias row
        loss = -np.mean(np.sum(onehot * np.log(p + 1e-12), 1)) + l2 * np.sum(reg ** 2)
        grad = a.T @ (p - onehot) / len(a)
        grad[:-1] += 2 * l2 * reg
        return loss, grad.ravel()

    w = minimize(loss_grad, np.zeros(np.prod(shape)), jac=True, method="L-BFGS-B",
                 options={"maxiter": max_iter}).x.reshape(shape)
    at = np.concatenate([(x_test - mean) / std, np.ones((len(x_test), 1))], 1)
    return float(np.mean(np.argmax(at @ w, 1) == y_test))


def collapse_stats(x: np.ndarray) -> dict[str, float]:
    """``x (n, C)``: mean pairwise cosine of distinct rows and mean per-dimension standard
    deviation of the L2-normalised rows (collapse: cosine -> 1, spread -> 0)."""
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(u)
    cos = (u @ u.T - np.eye(n)).sum() / max(n * (n - 1), 1)
    return {"mean_cosine": float(cos), "feature_spread": float(u.std(0).mean())}


def representation_probe(encode: Callable[[np.ndarray], np.ndarray], cache: Cache, fit_ids: Sequence[str],
                         test_ids: Sequence[str], crop_size: int, num_partitions: int, per_case: int = 8,
                         seed: int = 0, batch: int = 8) -> dict:
    """Probe accuracies (per labelling, mean over the three axes and per axis) with chance
    ``1/P``, and collapse statistics on the held-out slices inside their volumes. ``encode(images) -> (N, s, s, s, C)``
    enc4 features."""
    def features(ids, crop_seed):
        images, starts, shapes = probe_crops(cache, ids, crop_size, per_case, crop_seed)
        feats = np.concatenate([np.asarray(encode(images[i:i + batch]), np.float32)
                                for i in range(0, len(images), batch)])
        return pooled_slices(feats), partition_labels(feats.shape[1], crop_size, num_partitions, starts, shapes)

    fx, fy = features(fit_ids, seed)
    tx, ty = features(test_ids, seed + 1)
    out: dict = {"chance": 1.0 / num_partitions, "fit_cases": len(fit_ids), "test_cases": len(test_ids),
                 "crops_per_case": per_case}
    for kind in ("crop", "anatomy"):
        per_axis = []
        for a in range(3):
            xf, yf = fx[:, a].reshape(-1, fx.shape[-1]), fy[kind][:, a].reshape(-1)
            xt, yt = tx[:, a].reshape(-1, tx.shape[-1]), ty[kind][:, a].reshape(-1)
            per_axis.append(probe_accuracy(xf[yf >= 0], yf[yf >= 0], xt[yt >= 0], yt[yt >= 0], num_partitions))
        out[f"{kind}_accuracy"] = float(np.mean(per_axis))
        out[f"{kind}_accuracy_per_axis"] = per_axis
    out.update(collapse_stats(tx.reshape(-1, tx.shape[-1])[ty["anatomy"].reshape(-1) >= 0]))
    return out
