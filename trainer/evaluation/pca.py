"""The PCA baseline of the seed's results table: exact PCA of raw pixels and its two probes."""

from __future__ import annotations

import torch

from trainer.evaluation.probe import KNNOptions, ProbeOptions, as_float, knn_classify, linear_probe, resolve_device

# The PCA baseline's probe: the seed fits its logistic regression on the principal components as they come.
# Standardizing them would whiten: every component, down to the ~160 that only hold the rounding noise of the
# digits' uint8 upsampling, would weigh as much as the leading ones (92.7% instead of 96.8% on digits).
PCA_PROBE = ProbeOptions(standardize=False)


@torch.no_grad()
def pca_features(train_x, test_x, dim: int = 256, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Project train and test onto the top principal axes of train (raw values, flattened).

    Returns float32 CPU tensors (n, q), (m, q) with q = min(dim, n_features, n_samples); the default
    dim gives the seed README's 256. Centering uses the train mean; the axes come from an exact SVD in
    float64 (the baseline runs on in-memory pixel sets, where that takes seconds).
    Signs are deterministic: each axis has its largest-magnitude loading positive (like sklearn).
    """
    device = resolve_device(device)
    train_x, test_x = as_float(train_x), as_float(test_x)
    n, f = train_x.shape
    q = min(dim, n, f)
    x = train_x.to(device, torch.float64)
    mean = x.mean(dim=0)
    axes = torch.linalg.svd(x - mean, full_matrices=False).Vh[:q].T  # (f, q)
    rows = torch.arange(q, device=axes.device)
    signs = torch.sign(axes[axes.abs().argmax(dim=0), rows])
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)

    def project(z: torch.Tensor) -> torch.Tensor:
        return ((z.to(device, axes.dtype) - mean) @ axes).float().cpu()

    return project(train_x), project(test_x)


def raw_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, ...] as the baseline rows' features: [N, pixels] float32 in [0, 1]."""
    return images.flatten(1).float() / 255


def pca_baseline(train_pixels: torch.Tensor, train_y, test_pixels: torch.Tensor, test_y,
                 knn: KNNOptions | None = None, *, seed: int = 0, device=None) -> dict:
    """The seed's PCA rows {"dim", "linear_top1", "knn_top1"} from raw_pixels features: the top min(256, pixels)
    principal axes of train, the linear probe on the components as they come (PCA_PROBE) and the weighted kNN, all
    three on `device`."""
    pca_tr, pca_te = pca_features(train_pixels, test_pixels, dim=min(256, train_pixels.shape[1]), device=device)
    return {"dim": pca_tr.shape[1],
            "linear_top1": linear_probe(pca_tr, train_y, pca_te, test_y, PCA_PROBE, seed=seed, device=device)["top1"],
            "knn_top1": knn_classify(pca_tr, train_y, pca_te, test_y, knn or KNNOptions(), device=device)["top1"]}
