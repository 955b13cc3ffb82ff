"""NT-Xent (the SimCLR contrastive loss): this rank's 2n rows against the 2N embeddings gathered from all ranks."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import distributed


def rank_logits(local: torch.Tensor, columns: torch.Tensor, offset: int, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [2n, 2N] of this rank's rows (local = [view-1 rows; view-2 rows]) against all columns, self
    similarity set to -inf in place (no [2n, 2N] mask), and the column index of each row's positive.
    `offset` is where this rank's block starts among the columns (2n * rank)."""
    n2 = local.shape[0]
    logits = local @ columns.T / temperature
    rows = torch.arange(n2, device=local.device)
    logits[rows, rows + offset] = float("-inf")  # the division's backward does not need its output
    return logits, (rows + n2 // 2) % n2 + offset


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, cosine: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of this rank's pairs against every rank's embeddings.

    z1, z2: [n, d] projections of the two views of this rank's n samples (any float dtype).
    Returns (loss, top1): loss = mean over the 2n local rows of the cross-entropy of row i against the
    2N gathered columns (self-similarity masked out), the positive being the other view of sample i;
    top1 = fraction of local rows whose most similar column is their positive (no gradient).
    With DDP's gradient averaging over W ranks this is exactly the gradient of the single-process loss
    on the concatenated batch. Memory: a [2n, 2N] fp32 logit slice per rank, never [2N, 2N].
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two [n, d] tensors of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    local = torch.cat([z1, z2], dim=0).float()  # logits in fp32 whatever the autocast dtype
    if cosine:
        local = F.normalize(local, dim=1)
    columns = distributed.gather_with_grad(local)  # [2N, d], rank r's block at rows 2n*r .. 2n*(r+1)
    logits, positives = rank_logits(local, columns, 2 * z1.shape[0] * distributed.rank(), temperature)
    loss = F.cross_entropy(logits, positives)
    with torch.no_grad():
        top1 = (logits.argmax(dim=1) == positives).float().mean()
    return loss, top1


class NTXentLoss(nn.Module):
    """`NTXentLoss(temperature=0.5, use_cosine_similarity=True)(z1, z2)` -> scalar loss.

    Pass `return_accuracy=True` to also get the contrastive top-1 accuracy: `loss, top1 = loss_fn(z1, z2, True)`.
    Works in one process and under torch.distributed (embeddings gathered across ranks with gradients).
    """

    def __init__(self, temperature: float = 0.5, use_cosine_similarity: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature={temperature}: must be > 0")
        self.temperature = temperature
        self.use_cosine_similarity = use_cosine_similarity

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, return_accuracy: bool = False):
        loss, top1 = nt_xent(z1, z2, self.temperature, self.use_cosine_similarity)
        return (loss, top1) if return_accuracy else loss
