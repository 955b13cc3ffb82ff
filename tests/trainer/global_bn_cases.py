"""The experiments the GlobalBatchNorm tests compare: per-rank slices of one seeded batch through a layer for a few
training steps and an eval forward, and nn.BatchNorm on the concatenated batch in one process as the reference."""
import torch
import torch.nn as nn

C = 4
STEPS = 3  # training forwards before the running statistics are compared
BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def spec(dims=4, sizes=(8, 8), group_size=0, momenta=(0.1,) * STEPS, channels_last=False, dtype=None):
    """One experiment: input rank `dims`, per-rank batch sizes (their count is the world size), ranks per BN group
    (0: all), momentum before each training forward, memory format, autocast dtype."""
    return dict(dims=dims, sizes=tuple(sizes), group_size=group_size, momenta=tuple(momenta),
                channels_last=channels_last, dtype=dtype)


def full_batch(s: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of every rank for this step (same in every process) and a fixed tensor r: the loss
    is sum(y * r), a SUM over samples, so rank r's input gradient is a slice of the single-process one."""
    g = torch.Generator().manual_seed(100 + step)
    shape = (sum(s["sizes"]), C) + (5,) * (s["dims"] - 2)
    offset = torch.arange(C, dtype=torch.float32).view((1, C) + (1,) * (s["dims"] - 2))
    x = torch.randn(shape, generator=g) * (1 + offset) + 2 * offset - 1  # per-channel means and scales differ
    r = torch.randn(shape, generator=g)
    if s["dtype"] is not None:  # values the low-precision activation and its gradient hold exactly
        x, r = x.to(s["dtype"]).float(), r.to(s["dtype"]).float()
    return x, r


def init_layer(layer: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(C, generator=g))
        layer.bias.copy_(0.3 * torch.randn(C, generator=g))
    return layer


def run_steps(layer: nn.Module, s: dict, rows: slice, dtype=None, before_eval=lambda: None) -> dict:
    """STEPS training forwards + backwards on rows of each step's full batch, then one eval forward."""
    out = {"y": [], "grad_x": [], "grad_w": [], "grad_b": []}
    memory_format = torch.channels_last if s["channels_last"] else torch.contiguous_format
    for step in range(STEPS):
        x_full, r_full = full_batch(s, step)
        x = x_full[rows].to(dtype or torch.float32).contiguous(memory_format=memory_format).requires_grad_()
        layer.momentum = s["momenta"][step]
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            y = layer(x)
        (y.float() * r_full[rows]).sum().backward()
        out["y"].append(y.detach())
        out["grad_x"].append(x.grad)
        out["grad_w"].append(layer.weight.grad.clone())
        out["grad_b"].append(layer.bias.grad.clone())
        layer.zero_grad()
    out["running"] = [layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()]
    layer.eval()
    before_eval()
    out["y_eval"] = layer(full_batch(s, STEPS)[0][rows].contiguous(memory_format=memory_format))
    return out


def rank_rows(s: dict, rank: int) -> slice:
    start = sum(s["sizes"][:rank])
    return slice(start, start + s["sizes"][rank])


def group_of(s: dict, rank: int) -> list[int]:
    world = len(s["sizes"])
    k = s["group_size"] or world
    return list(range(rank // k * k, rank // k * k + k))


def reference(s: dict, ranks: list[int]) -> dict:
    """nn.BatchNorm in one process on the concatenation of `ranks`' batches (fp32)."""
    rows = slice(rank_rows(s, ranks[0]).start, rank_rows(s, ranks[-1]).stop)
    return run_steps(init_layer(BN[s["dims"]](C)), s, rows)


def assert_equal_to_reference(s: dict, results: list[dict], tol: float = 1e-5, low_tol: float = 1e-5):
    """Each group's ranks against nn.BatchNorm on that group's concatenated batch. low_tol: for tensors in the
    autocast dtype (outputs and input gradients)."""
    close = dict(atol=low_tol, rtol=low_tol)
    for group in {tuple(group_of(s, r)) for r in range(len(results))}:
        ref = reference(s, list(group))
        start = rank_rows(s, group[0]).start
        for rank in group:
            got, rows = results[rank], rank_rows(s, rank)
            local = slice(rows.start - start, rows.stop - start)
            for step in range(STEPS):
                torch.testing.assert_close(got["y"][step].float(), ref["y"][step][local], **close,
                                           msg=lambda m: f"rank {rank} step {step} output: {m}")
                torch.testing.assert_close(got["grad_x"][step].float(), ref["grad_x"][step][local], **close,
                                           msg=lambda m: f"rank {rank} step {step} input gradient: {m}")
            for name, value, want in zip(("running_mean", "running_var", "num_batches_tracked"),
                                         got["running"], ref["running"]):
                torch.testing.assert_close(value, want, atol=tol, rtol=tol, msg=lambda m: f"rank {rank} {name}: {m}")
            torch.testing.assert_close(got["y_eval"].float(), ref["y_eval"][local], **close,
                                       msg=lambda m: f"rank {rank} eval output: {m}")
        for step in range(STEPS):  # the sum over the group's ranks of their parameter gradients
            for name in ("grad_w", "grad_b"):
                summed = sum(results[rank][name][step] for rank in group)
                torch.testing.assert_close(summed, ref[name][step], atol=tol, rtol=tol,
                                           msg=lambda m: f"group {group} step {step} {name}: {m}")
