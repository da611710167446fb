"""A user plugin for the layer registry's tests: `--plugin tests.registry_plugin` registers "Swish"."""

from __future__ import annotations

import torch
from torch import nn

from converter.layers import LayerSpec, register


class Swish(nn.Module):
    """x * sigmoid(x): a layer type Caffe itself does not have."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


@register("Swish")
def swish(spec: LayerSpec) -> nn.Module:
    spec.bottoms(1)
    spec.tops(1)
    return Swish()
