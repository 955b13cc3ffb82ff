"""One SimCLR optimization step (forward both views, NT-Xent, scaled backward, clip, step) and the AMP choice."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.loss import NTXentLoss


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA devices that support it, else off (CPU autocast is slower than fp32 here)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def train_step(model: nn.Module, loss_fn: NTXentLoss, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, x1: torch.Tensor, x2: torch.Tensor,
               amp_dtype: torch.dtype | None, grad_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this rank's two augmented views; returns (loss, top1) detached, no host sync."""
    device_type = x1.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        z = model(torch.cat([x1, x2]))  # one forward: BatchNorm sees both views together
    loss, top1 = loss_fn(*z.float().chunk(2), return_accuracy=True)  # fp32 logits
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # DDP all-reduces (averages) gradients here
    apply_gradients(model, optimizer, scaler, grad_clip)
    return loss.detach(), top1


def apply_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    grad_clip: float) -> None:
    """Unscale (fp16), clip the global gradient norm if asked, step (skipped by the scaler on inf), update."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
