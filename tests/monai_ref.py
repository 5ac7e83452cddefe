"""MONAI reference models for parity tests (test-only: imports torch and monai)."""

from __future__ import annotations

import types

import numpy as np
import torch
from monai.networks.nets import UNETR as MonaiUNETR

from jaxseg.models import skip_layers


def monai_unetr(num_layers: int = 12, seed: int = 0, **kwargs) -> MonaiUNETR:
    """MONAI's UNETR with ``num_layers`` ViT blocks (MONAI fixes 12), skips spread as jaxseg does."""
    torch.manual_seed(seed)
    net = MonaiUNETR(**kwargs)
    net.vit.blocks = net.vit.blocks[:num_layers]
    s2, s3, s4 = skip_layers(num_layers)

    def forward(self, x_in):
        x, hidden = self.vit(x_in)
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(self.proj_feat(hidden[s2]))
        enc3 = self.encoder3(self.proj_feat(hidden[s3]))
        enc4 = self.encoder4(self.proj_feat(hidden[s4]))
        dec3 = self.decoder5(self.proj_feat(x), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))

    net.forward = types.MethodType(forward, net)
    # Randomise the affine-free parts' neighbours too: MONAI inits biases at zero, which would
    # hide a bias mix-up; give every parameter a random value.
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1))
    return net.eval()


def state_dict_numpy(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def to_torch(x_channels_last: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_channels_last, -1, 1)))


def to_channels_last(t: torch.Tensor) -> np.ndarray:
    return np.moveaxis(t.detach().cpu().numpy(), 1, -1)
