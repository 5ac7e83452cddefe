"""PyTorch/MONAI reference pre-training step for the benchmarks (optional `bench` extra).

Two loss implementations: vectorised (the same similarity tensor and masks as jaxseg) and the
authors' loop style (a Python loop of per-triplet cosine calls; for contrastive, every one of
the 576 entries sums over all 576 dissimilar entries, timed on a subset and extrapolated).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from jaxseg.losses.objectives import paper_triplet_mask


def partition_slices(feats: torch.Tensor, axis: int, offsets) -> torch.Tensor:
    """feats (M, C, D, H, W) -> (M, P, C, F)."""
    p = len(offsets)
    size = feats.shape[2 + axis] // p
    idx = torch.as_tensor([q * size + int(o) for q, o in enumerate(offsets)], device=feats.device)
    s = feats.index_select(2 + axis, idx).movedim(2 + axis, 1)  # (M, P, C, a, b)
    return s.flatten(3)


def comparative_vectorised(s: torch.Tensor, t: float) -> torch.Tensor:
    n, p = s.shape[:2]
    u = F.normalize(s, dim=-1, eps=1e-6)
    sim = torch.einsum("npcf,mqcf->cnpmq", u, u)
    idx = torch.arange(p)
    s_pos = sim[:, :, idx, :, idx].movedim(0, -1)  # (C, i, j, p)
    s_neg = torch.diagonal(sim, dim1=1, dim2=3).movedim(-1, 1)  # (C, i, p, q)
    z = (s_neg[:, :, None] - s_pos[..., None]) / t
    mask = torch.from_numpy(np.broadcast_to(paper_triplet_mask(n, p)[None], z.shape).copy()).to(z.device)
    return F.softplus(z)[mask].mean()


def contrastive_vectorised(s: torch.Tensor, t: float) -> torch.Tensor:
    n, p = s.shape[:2]
    u = F.normalize(s, dim=-1, eps=1e-6)
    sim = torch.einsum("npcf,mqcf->cnpmq", u, u) / t
    idx = torch.arange(p)
    s_pos = sim[:, :, idx, :, idx].movedim(0, -1)
    s_neg = torch.diagonal(sim, dim1=1, dim2=3).movedim(-1, 1)
    s_neg = s_neg.masked_fill(torch.eye(p, dtype=torch.bool, device=s.device), float("-inf"))
    lse = torch.logaddexp(s_pos, torch.logsumexp(s_neg, -1)[:, :, None, :])
    mask = ~torch.eye(n, dtype=torch.bool, device=s.device)[None, :, :, None].expand_as(lse)
    return (lse - s_pos)[mask].mean()


def _cos(a, b):  # per channel over the flattened slice, as the authors
    return F.cosine_similarity(a, b, dim=-1)


def comparative_loop(s: torch.Tensor, t: float) -> torch.Tensor:
    """The authors' triplets: per partition, every ordered pair of its slices, any other-partition slice."""
    n, p = s.shape[:2]
    total = 0.0
    for a in range(p):
        for r, m in itertools.permutations(range(n), 2):
            for m2, b in itertools.product(range(n), range(p)):
                if b != a:
                    total = total + F.softplus((_cos(s[r, a], s[m2, b]) - _cos(s[r, a], s[m, a])) / t).mean()
    return total


def contrastive_loop(s: torch.Tensor, t: float, entries: int | None = None) -> torch.Tensor:
    """The authors' contrastive code: for each of the N(N-1)P(N(P-1)) entries (576 at N=P=4), the
    denominator sums over ALL dissimilar entries again. ``entries`` limits how many are computed."""
    n, p = s.shape[:2]
    triplets = [(a, r, m, m2, b) for a in range(p) for r, m in itertools.permutations(range(n), 2)
                for m2, b in itertools.product(range(n), range(p)) if b != a]
    total = 0.0
    for (a, r, m, _, _) in triplets[:entries]:
        pos = torch.exp(_cos(s[r, a], s[m, a]) / t)
        neg = sum(torch.exp(_cos(s[r, a], s[m2, b]) / t) for (_, _, _, m2, b) in triplets)
        total = total + (-torch.log(pos / (pos + neg))).mean()
    return total


def make_step(net, opt, objective: str, stage: str, impl: str, num_partitions: int, temperature: float,
              entries: int | None = None):
    """One pre-training step (3 axes in turn) on crops (M, C, S, S, S)."""
    losses = {("comparative", "vectorised"): comparative_vectorised,
              ("contrastive", "vectorised"): contrastive_vectorised,
              ("comparative", "loop"): comparative_loop,
              ("contrastive", "loop"): lambda s, t: contrastive_loop(s, t, entries)}
    loss_fn = losses[(objective, impl)]

    def features(x):  # float32 for the loss, also under autocast (as jaxseg)
        if stage == "encoder":
            _, hidden = net.vit(x)
            return net.encoder4(net.proj_feat(hidden[9])).float()
        return torch.softmax(net(x).float(), 1)

    def step(x, offsets):
        out = 0.0
        for axis in range(3):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(partition_slices(features(x), axis, offsets[axis]), temperature)
            loss.backward()
            opt.step()
            out += loss.item()
        return out / 3

    return step
