"""Small ResNet-style backbones for low-resolution images on CPUs (the digits quickstart), by name.

Each entry of BACKBONES builds a randomly initialized network that maps (N, 3, H, W) images to (N, feature_dim)
features, like a torchvision ResNet with fc = Identity; `model.base_model` accepts these names too.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

# name -> (small_stem -> (backbone, feature_dim))
BACKBONES: dict[str, Callable[[bool], tuple[nn.Module, int]]] = {}
