"""Test images with real texture, shared by the colour and crop tests: crops of scikit-learn's sample photographs."""
import torch
from sklearn.datasets import load_sample_image


def photo_crops(count: int, side: int, seed: int = 0) -> torch.Tensor:
    """uint8 [count, 3, side, side]: random crops of scikit-learn's two sample photographs (427 x 640)."""
    photos = [torch.from_numpy(load_sample_image(n).copy()).permute(2, 0, 1) for n in ("china.jpg", "flower.jpg")]
    g = torch.Generator().manual_seed(seed)
    tops = torch.randint(0, 427 - side + 1, (count,), generator=g).tolist()
    lefts = torch.randint(0, 640 - side + 1, (count,), generator=g).tolist()
    return torch.stack([photos[i % 2][:, t:t + side, x:x + side] for i, (t, x) in enumerate(zip(tops, lefts))])
