"""Evaluation numerics on frozen features: linear probe (L-BFGS or mini-batch Adam) and weighted kNN (PCA: pca.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from data.splits import stratified_split
from trainer.optim import lr_at, set_lr

# L2 strengths tried by the linear probe: penalty 0.5 * wd * ||W||^2 added to the mean cross-entropy,
# on standardized features. sklearn's LogisticRegression(C) on n samples is wd = 1 / (C * n).
DEFAULT_WEIGHT_DECAYS = tuple(10.0**e for e in range(-6, 1))

# At or below this many train elements (rows x features) the probe uses full-batch L-BFGS.
LBFGS_MAX_ELEMENTS = 2**25


@dataclass(frozen=True)
class ProbeOptions:
    """How linear_probe fits: the L2 strengths it chooses from and the solver.

    solver: "lbfgs" (full batch on the device; exact optimum, best for up to ~10^7 elements), "minibatch" (Adam,
    epochs x batch_size, lr cosine-decayed to 0; features stay on CPU and are streamed to the device), or "auto"
    (L-BFGS up to LBFGS_MAX_ELEMENTS train elements).
    standardize: fit on features scaled to zero mean and unit variance (the seed's StandardScaler on network
    features), or on the features as they are (pca.PCA_PROBE: principal components, see there).
    """

    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS
    val_fraction: float = 0.2  # the stratified part of train that scores each weight decay
    solver: Literal["auto", "lbfgs", "minibatch"] = "auto"
    max_iter: int = 500  # L-BFGS iterations
    epochs: int = 100  # mini-batch Adam: passes over train
    batch_size: int = 1024
    lr: float = 1e-3
    standardize: bool = True


@dataclass(frozen=True)
class KNNOptions:
    """The weighted kNN of knn_scores: k neighbours, vote temperature, centering, queries per chunk."""

    k: int = 200
    temperature: float = 0.1
    center: bool = True  # subtract the bank's mean feature from bank and queries first
    chunk_size: int = 1024  # queries at a time (memory chunk_size x n_train)


# ----------------------------------------------------------------------------- small helpers


def as_float(x) -> torch.Tensor:
    """A float32 CPU tensor (2-D) from a numpy array or a tensor; no copy when already so."""
    x = torch.as_tensor(x)
    return x.reshape(x.shape[0], -1).to(device="cpu", dtype=torch.float32)


def _as_labels(y) -> torch.Tensor:
    return torch.as_tensor(y).reshape(-1).to(device="cpu", dtype=torch.int64)


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _num_classes(num_classes, *labels: torch.Tensor) -> int:
    inferred = max(int(y.max()) for y in labels if y.numel()) + 1
    if num_classes is None:
        return inferred
    if inferred > num_classes:
        raise ValueError(f"labels go up to {inferred - 1} but num_classes={num_classes}")
    return int(num_classes)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Fractions of rows whose label is among the k highest scores: {"top1": ..., "top5": ...}.

    scores: (n, C); labels: (n,). A k larger than C is skipped (no "top5" with 3 classes).
    """
    labels = labels.to(scores.device)
    maxk = min(max(ks), scores.shape[1])
    pred = scores.topk(maxk, dim=1).indices  # (n, maxk), best first
    hit = pred.eq(labels.view(-1, 1))
    return {f"top{k}": hit[:, :k].any(dim=1).float().mean().item() for k in ks if k <= scores.shape[1]}


# ----------------------------------------------------------------------------- linear probe
def _standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of x (float64 accumulation); constant features get std 1."""
    mean = x.mean(dim=0, dtype=torch.float64)
    var = (x.double() - mean).pow(2).mean(dim=0) if x.numel() <= 2**26 else _chunked_var(x, mean)
    std = var.sqrt()
    std = torch.where(std > 1e-8 * (mean.abs() + 1), std, torch.ones_like(std))
    return mean.float(), std.float()


def _chunked_var(x: torch.Tensor, mean: torch.Tensor, rows: int = 65536) -> torch.Tensor:
    total = torch.zeros_like(mean)
    for i in range(0, x.shape[0], rows):
        total += (x[i : i + rows].double() - mean).pow(2).sum(dim=0)
    return total / x.shape[0]


def _objective(x, y, weight, bias, weight_decay):
    """Mean cross-entropy plus 0.5 * weight_decay * ||weight||^2 (the bias is not penalized)."""
    return F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()


def _fit_lbfgs(x, y, num_classes, weight_decay, max_iter):
    """Full-batch L-BFGS (strong Wolfe line search) from zeros; x is standardized, on device."""
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = _objective(x, y, weight, bias, weight_decay)
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def _fit_minibatch(x, y, num_classes, weight_decay, stats, options: ProbeOptions, device, seed):
    """Mini-batch Adam on the same objective, lr cosine-decayed (trainer.optim.lr_at without warmup); x stays
    where it is (CPU is fine) and is standardized with stats = (mean, std) batch by batch."""
    weight = torch.zeros(x.shape[1], num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=options.lr)
    total_steps = options.epochs * math.ceil(x.shape[0] / options.batch_size)
    generator = torch.Generator().manual_seed(seed)
    mean, std = (s.to(device) for s in stats)
    step = 0
    for _ in range(options.epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for i in range(0, x.shape[0], options.batch_size):
            idx = order[i : i + options.batch_size]
            xb = (x[idx].to(device, non_blocking=True) - mean) / std
            yb = y[idx].to(device, non_blocking=True)
            set_lr(opt, lr_at(step, total_steps, 0, options.lr))
            opt.zero_grad(set_to_none=True)
            _objective(xb, yb, weight, bias, weight_decay).backward()
            opt.step()
            step += 1
    return weight.detach(), bias.detach()


@torch.no_grad()
def _scores(x, weight, bias, mean, std, rows: int = 16384) -> torch.Tensor:
    """Logits (n, C) on weight's device, standardizing x chunk by chunk."""
    mean, std = mean.to(weight.device), std.to(weight.device)
    out = [((x[i : i + rows].to(weight.device) - mean) / std) @ weight + bias for i in range(0, len(x), rows)]
    return torch.cat(out) if out else torch.zeros(0, weight.shape[1], device=weight.device)


def _fit(x, y, num_classes, weight_decay, options: ProbeOptions, solver: str, device, seed):
    """Standardize x with its own statistics (or not: options.standardize), fit; (weight, bias, mean, std)."""
    if options.standardize:
        mean, std = _standardizer(x)
    else:
        mean, std = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    if solver == "lbfgs":
        xs = (x.to(device) - mean.to(device)) / std.to(device)
        weight, bias = _fit_lbfgs(xs, y.to(device), num_classes, weight_decay, options.max_iter)
    else:
        weight, bias = _fit_minibatch(x, y, num_classes, weight_decay, (mean, std), options, device, seed)
    return weight, bias, mean, std


def linear_probe(train_x, train_y, test_x, test_y, options: ProbeOptions = ProbeOptions(), *,
                 num_classes: int | None = None, device=None, seed: int = 0) -> dict:
    """Multinomial logistic regression on frozen features, L2 strength chosen on a validation split.

    train_x (n, d), test_x (m, d): features (tensor or numpy; flattened past dim 1), standardized
    with the statistics of the set being fitted (unless options.standardize is False). train_y, test_y: integer
    class ids.
    For each weight decay wd in ``options.weight_decays`` (objective: mean cross-entropy + 0.5*wd*||W||^2,
    bias unpenalized) fit on a stratified (1 - val_fraction) part of train and score top-1 on the
    rest; refit on all of train with the best wd (ties: the larger wd) and report test accuracy.
    The solver is options.solver (see ProbeOptions), run on ``device`` (default: CUDA if any).
    Deterministic given ``seed`` (split and shuffling; both solvers start from zeros).

    Returns {"top1", "top5" (with >= 5 classes), "weight_decay", "val_top1", "val_top1_by_wd",
    "solver"}; accuracies are fractions in [0, 1].
    """
    train_x, test_x = as_float(train_x), as_float(test_x)
    train_y, test_y = _as_labels(train_y), _as_labels(test_y)
    num_classes = _num_classes(num_classes, train_y, test_y)
    solver = options.solver
    if solver == "auto":
        solver = "lbfgs" if train_x.numel() <= LBFGS_MAX_ELEMENTS else "minibatch"
    if solver not in ("lbfgs", "minibatch"):
        raise ValueError(f"solver must be 'auto', 'lbfgs' or 'minibatch', got {solver!r}")
    device = resolve_device(device)
    weight_decays = sorted(float(wd) for wd in options.weight_decays)
    if not weight_decays:
        raise ValueError("weight_decays is empty")

    val_by_wd = {}
    if len(weight_decays) > 1:
        tr, va = stratified_split(train_y, options.val_fraction, seed)
        if va.numel() == 0:
            raise ValueError("validation split is empty: too few samples per class for val_fraction")
        for wd in weight_decays:
            weight, bias, mean, std = _fit(train_x[tr], train_y[tr], num_classes, wd, options, solver, device, seed)
            val_by_wd[wd] = topk_accuracy(_scores(train_x[va], weight, bias, mean, std), train_y[va], (1,))["top1"]
        best_wd = max(weight_decays, key=lambda wd: (val_by_wd[wd], wd))
    else:
        best_wd = weight_decays[0]

    weight, bias, mean, std = _fit(train_x, train_y, num_classes, best_wd, options, solver, device, seed)
    result = topk_accuracy(_scores(test_x, weight, bias, mean, std), test_y)
    result.update(weight_decay=best_wd, val_top1=val_by_wd.get(best_wd), val_top1_by_wd=val_by_wd, solver=solver)
    return result


# ----------------------------------------------------------------------------- weighted kNN
@torch.no_grad()
def knn_scores(train_x, train_y, query_x, options: KNNOptions = KNNOptions(), *, num_classes: int | None = None,
               device=None) -> torch.Tensor:
    """Class votes (m, C) of the weighted kNN monitor of InstDisc / DINO, as float32 on CPU.

    With ``options.center`` (the default) the bank's mean feature is first subtracted from bank and queries
    (cosine similarity around the data, not around the origin: the PCA baseline is centered by
    construction, and post-ReLU backbone features all share one large positive direction that
    otherwise crowds every query's neighbourhood with other classes). Rows are then L2-normalized;
    each query's k most cosine-similar train rows (k capped at the bank size) vote for their class
    with weight exp((sim - sim_max) / temperature), i.e. exp(sim / T) scaled per query so that its nearest
    neighbour weighs 1: no overflow or underflow at any temperature (a query's ranking is unchanged; compare
    votes within a query, not across queries). center=False is the plain
    InstDisc computation. Queries are processed ``chunk_size`` rows at a time (memory chunk_size x n_train).
    """
    device = resolve_device(device)
    train_y = _as_labels(train_y)
    num_classes = num_classes if num_classes is not None else int(train_y.max()) + 1
    bank = as_float(train_x).to(device)  # (n, d)
    mean = bank.mean(0, keepdim=True) if options.center else None
    # one working copy of the bank (the caller's features stay untouched), normalized in place
    bank = bank - mean if mean is not None else bank.clone()
    bank.div_(bank.norm(dim=1, keepdim=True).clamp_min_(1e-12))  # = F.normalize(bank, dim=1)
    bank_labels = train_y.to(device)
    query_x = as_float(query_x)
    k = min(options.k, bank.shape[0])
    out = []
    for i in range(0, query_x.shape[0], options.chunk_size):
        q = query_x[i : i + options.chunk_size].to(device)
        q = F.normalize(q - mean if mean is not None else q, dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (b, k) each
        weights = ((sim - sim[:, :1]) / options.temperature).exp()  # topk sorts: column 0 is the query's largest
        votes = torch.zeros(q.shape[0], num_classes, device=device)
        votes.scatter_add_(1, bank_labels[idx], weights)
        out.append(votes.cpu())
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_classify(train_x, train_y, test_x, test_y, options: KNNOptions = KNNOptions(), *,
                 num_classes: int | None = None, device=None) -> dict:
    """Weighted kNN accuracy (see knn_scores): {"top1", "top5" (with >= 5 classes), "k", "centered"}."""
    train_y, test_y = _as_labels(train_y), _as_labels(test_y)
    num_classes = _num_classes(num_classes, train_y, test_y)
    votes = knn_scores(train_x, train_y, test_x, options, num_classes=num_classes, device=device)
    result = topk_accuracy(votes, test_y)
    result["k"], result["centered"] = min(options.k, len(train_y)), options.center
    return result
