"""Global BatchNorm: batch statistics over a process group's whole batch, pure torch, no host syncs, CPU and CUDA.

SimCLR normalizes with the statistics of the global batch (the paper's "global BN": per-rank statistics let
each rank's positives recognize each other by their shared batch statistics and the contrastive task leaks).
PyTorch's nn.SyncBatchNorm does that on CUDA only, with a boolean-mask index per layer per forward (a
device-to-host sync: about 53 per ResNet-50 forward) and a graph break under torch.compile. GlobalBatchNorm
does it with ordinary tensor ops and one all-reduce per layer in forward and one in backward, so it runs with
gloo on the CPU (where the trainer's tests prove it equal to one process on the concatenated batch) and with
NCCL on CUDA, and traces under torch.compile.

The one assumption: every rank of the group runs the same BatchNorm layers in the same order (each forward
and each backward is a collective over the group), as data-parallel training does. The loaders give every rank
an equal batch; the statistics do not need it (the element count is reduced with the sums), but the gradient
convention is DDP's: rank r's input gradient is the gradient of the SUM over ranks of their losses, and the
weight / bias gradients are this rank's share, which DDP's averaging turns into that of the mean loss.

Eval mode, a process without torch.distributed, and a one-rank group use nn.BatchNorm's own forward unchanged.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F


def _group_size(group) -> int:
    """Ranks that share statistics: 1 without an initialized process group (no communication at all)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    size = dist.get_world_size(group)
    if size < 1:  # dist returns -1 on a rank outside the group
        raise ValueError("GlobalBatchNorm: this rank is not a member of the layer's process group; create the "
                         "groups with dist.new_group in every rank and give each rank's layers the group it is in")
    return size


def _all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """SUM over the group, out of place. Functional collective rather than dist.all_reduce: it is traceable by
    torch.compile (no graph break) and, checked on torch 2.14, runs on gloo (CPU) as on NCCL, in eager mode and
    inside an autograd.Function's backward. Its result waits for the collective on first use; no host sync."""
    return funcol.all_reduce(tensor, "sum", group if group is not None else dist.group.WORLD)


def _channel_sums(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (dim 1): (sum of grad * (x - mean) * invstd, sum of grad), accumulated in mean's dtype.

    The fused reduction of BatchNorm's own backward (one pass over both tensors, either memory format, low
    precision inputs accumulated in fp32, CPU and CUDA kernels) with its input gradient switched off; with
    grad = x, mean = 0, invstd = 1 it gives (sum x^2, sum x) for the forward's statistics."""
    ones = torch.ones_like(mean)  # the weight only scales the input gradient, which is not computed
    _, sum_grad_xhat, sum_grad = torch.ops.aten.native_batch_norm_backward(
        grad, x, ones, None, None, mean, invstd, True, 0.0, [False, True, True])
    return sum_grad_xhat, sum_grad


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """x's memory format (channels_last for NHWC / NDHWC strides, else contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class _GlobalBatchNormFunction(torch.autograd.Function):
    """y = weight * (x - mean) * invstd + bias with mean / var over the group's whole batch.

    Forward: N = sum over ranks of the element count per channel, mean = S1 / N, var = S2 / N - mean^2
    (biased, as BatchNorm normalizes), from the per-rank sums S1 = sum x, S2 = sum x^2 (fp32), all-reduced
    together. The variance's relative error is about 1e-7 * (1 + mean^2 / var) in fp32, fine for the
    activations BatchNorm sees.
    Backward (L = the sum of every rank's loss, g = dL/dy, xhat = (x - mean) * invstd, sums over all ranks):
        dL/dx = weight * invstd * (g - sum(g) / N - xhat * sum(g * xhat) / N)
    since mean and invstd depend on every rank's x; only the two per-channel sums cross ranks (one
    all-reduce). dL/dweight = sum(g * xhat) and dL/dbias = sum(g) are returned as this rank's part, the sum over
    ranks being what DDP's all-reduce adds up (then divides by the world size, as for every other parameter).
    Saved for backward: x in its own dtype and three per-channel tensors (no fp32 copy of x, no xhat).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        compute = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics for bf16 / fp16 activations
        channels = x.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            zeros = torch.zeros(channels, dtype=compute, device=x.device)
            sum_sq, total = _channel_sums(x, x, zeros, torch.ones_like(zeros))
            count = torch.full((1,), x.numel() // max(channels, 1), dtype=compute, device=x.device)
            sums = _all_reduce_sum(torch.cat([total, sum_sq, count]), group)  # one collective: S1, S2, N
            total, sum_sq, count = sums[:channels], sums[channels:2 * channels], sums[2 * channels:]
            mean = total / count
            var = (sum_sq / count - mean * mean).clamp_min(0)  # rounding can make it slightly negative
            invstd = torch.rsqrt(var + eps)
            w = weight.to(compute) if weight is not None else None
            b = bias.to(compute) if bias is not None else None
            # eval-mode BatchNorm with the global statistics: one fused pass, x's dtype and memory format
            y = F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_count):
        x, weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            # the gradient in x's layout: the fused reduction loses precision on mixed layouts with bf16 (CPU,
            # torch 2.14: 1e-3 relative on sum(g)); a copy only where they differ
            grad_y = grad_y.contiguous(memory_format=_memory_format(x))
            sum_g_xhat, sum_g = _channel_sums(grad_y, x, mean, invstd)
            if need_x:  # the same on every rank (same model), so every rank joins this collective or none does
                channels = mean.shape[0]
                sums = _all_reduce_sum(torch.cat([sum_g, sum_g_xhat]), ctx.group)
                mean_g, mean_g_xhat = sums[:channels] / count, sums[channels:] / count
                w = weight.to(mean.dtype) if weight is not None else torch.ones_like(mean)
                shape = (channels,) + (1,) * (x.dim() - 2)
                # dL/dx = k * g + a * x + c per channel: two passes, x's memory format kept
                k = w * invstd
                a = -k * invstd * mean_g_xhat
                c = -k * mean_g - a * mean
                grad_x = torch.addcmul(c.view(shape), x, a.view(shape)).addcmul_(grad_y, k.view(shape))
                grad_x = grad_x.to(x.dtype)
            if weight is not None and need_weight:
                grad_weight = sum_g_xhat.to(weight.dtype)
            if need_bias:
                grad_bias = sum_g.to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A drop-in for nn.BatchNorm1d / 2d / 3d (same parameters, buffers and state_dict keys) whose training
    statistics are those of the whole batch of `group` (None: every rank).

    Inputs (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), any memory format (kept) and float dtype
    (statistics in fp32, output in the input's dtype). `momentum`, read at every call, has nn.BatchNorm's
    meaning: 0.0 keeps the running statistics, 1.0 replaces them by this batch's, None averages all batches
    so far; running_var gets the unbiased variance of the global batch. In training with more than one rank
    the update needs no host sync (also for momentum None, unlike nn.BatchNorm).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"GlobalBatchNorm: expected a 2D to 5D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or _group_size(self.group) == 1:
            return super().forward(input)  # nn.BatchNorm exactly: eval (running or local statistics), one rank
        y, mean, var, count = _GlobalBatchNormFunction.apply(input, self.weight, self.bias, self.eps, self.group)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                factor = 0.0 if self.momentum is None else self.momentum
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                    if self.momentum is None:  # cumulative average; a tensor, where nn.BatchNorm syncs (float())
                        factor = (1.0 / self.num_batches_tracked).to(self.running_mean.dtype)
                unbiased = var * (count / (count - 1))
                # lerp: exact at factor 0 (statistics kept) and 1 (this batch's)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y

    def __deepcopy__(self, memo):
        """A copy shares the process group (a communicator cannot be copied; nn.SyncBatchNorm's copy fails)."""
        if self.group is not None:
            memo[id(self.group)] = self.group
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new


def convert_global_batchnorm(module: nn.Module, group=None) -> nn.Module:
    """Like nn.SyncBatchNorm.convert_sync_batchnorm: every nn.BatchNorm1d / 2d / 3d and nn.SyncBatchNorm in
    `module` (itself included) becomes a GlobalBatchNorm over `group` (None: every rank) holding the very same
    parameter and buffer tensors (so requires_grad, device, dtype, values and an optimizer built before stay
    right), with the same eps, momentum, affine, track_running_stats and training flag. Returns the module
    (a new one where `module` itself was a BatchNorm). GlobalBatchNorm layers are left as they are."""
    converted = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)) \
            and not isinstance(module, GlobalBatchNorm):
        tensors = [t for t in (module.weight, module.running_mean) if t is not None]
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats, group=group,
                                    device=tensors[0].device if tensors else None,
                                    dtype=tensors[0].dtype if tensors else None)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_global_batchnorm(child, group))
    return converted
