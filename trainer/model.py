"""SimCLR network: torchvision ResNet backbone (fc removed, optional small-image stem) and projection head, and the
network as a run trains it (fine-tune weights, activation checkpointing, global BatchNorm, channels_last, DDP,
compile)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from trainer import small_nets
from trainer.checkpoint import load_backbone_weights
from trainer.config import Config, ModelConfig


def build_backbone(base_model: str, small_stem: bool = False) -> tuple[nn.Module, int]:
    """A randomly initialized torchvision ResNet with fc = Identity; returns (backbone, feature_dim).

    small_stem: 3x3 stride-1 first conv and no max-pool (CIFAR/STL10-size images), as in the SimCLR paper.
    """
    if base_model in small_nets.BACKBONES:
        return small_nets.BACKBONES[base_model](small_stem)
    constructor = getattr(torchvision.models, base_model, None)
    if constructor is None or not base_model.startswith("resnet"):
        raise ValueError(f"base_model={base_model!r}: not a torchvision ResNet")
    net = constructor(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


class ProjectionHead(nn.Sequential):
    """(Linear -> BN -> ReLU) x (layers - 1), then Linear to out_dim; hidden width = the backbone's feature size."""

    def __init__(self, in_dim: int, out_dim: int, layers: int = 2):
        blocks: list[nn.Module] = []
        for _ in range(layers - 1):
            blocks += [nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True)]
        blocks.append(nn.Linear(in_dim, out_dim))
        super().__init__(*blocks)


class SimCLRModel(nn.Module):
    """backbone(x) -> h (the representation evaluated downstream) -> head(h) -> z (fed to NT-Xent)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@contextlib.contextmanager
def bn_statistics_frozen(module: nn.Module):
    """BatchNorm keeps its running statistics (momentum 0, counter restored) while any other change to the
    buffers stays (DDP's broadcast): for a checkpoint's recompute and the cached step's first pass."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class CheckpointedSequential(nn.Sequential):
    """An nn.Sequential stage whose activations are recomputed in backward instead of stored.

    The recompute leaves BatchNorm running statistics alone, so they advance once per step, not twice.
    Parameter names (state_dict keys) are those of the plain stage.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        return checkpoint(super().forward, x, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), bn_statistics_frozen(self)))


def enable_activation_checkpointing(backbone: nn.Module) -> None:
    """Checkpoints layer1..layer4 of a torchvision ResNet in place (same modules, same keys)."""
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(backbone, name)
        if type(stage) is nn.Sequential:
            stage.__class__ = CheckpointedSequential


def build_model(cfg: ModelConfig) -> SimCLRModel:
    backbone, feature_dim = build_backbone(cfg.base_model, cfg.small_stem)
    return SimCLRModel(backbone, ProjectionHead(feature_dim, cfg.out_dim, cfg.head_layers), feature_dim)


def sync_batchnorm_groups(world_size: int, group_size: int) -> list[list[int]]:
    """Ranks that share BN statistics: consecutive blocks of group_size ranks (0 or >= world: one group)."""
    if group_size <= 0 or group_size >= world_size:
        return [list(range(world_size))]
    if world_size % group_size:
        raise ValueError(f"model.sync_bn_group_size={group_size} does not divide the world size {world_size}")
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


def new_sync_batchnorm_group(world_size: int, rank: int, group_size: int):
    """The process group this rank's BatchNorm layers reduce over: None (the default group, no new
    communicator) when one group holds every rank; otherwise every rank creates every group (torch.distributed
    requires it), in the same order, and gets its own."""
    import torch.distributed as dist

    groups = sync_batchnorm_groups(world_size, group_size)
    if len(groups) == 1:
        return None
    handles = [dist.new_group(ranks) for ranks in groups]
    return next(h for h, ranks in zip(handles, groups) if rank in ranks)


def synchronize_batchnorm(model: nn.Module, impl: str, world_size: int, rank: int, group_size: int) -> nn.Module:
    """Every BatchNorm layer normalizes with the statistics of its group's whole batch (SimCLR's global BN).

    impl "global": trainer.global_bn (pure torch collectives: CPU and CUDA, no host syncs, compile-friendly);
    "torch": nn.SyncBatchNorm (CUDA only; a device-to-host sync per layer per forward)."""
    group = new_sync_batchnorm_group(world_size, rank, group_size)
    if impl == "global":
        from trainer.global_bn import convert_global_batchnorm
        return convert_global_batchnorm(model, group)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)


# ----------------------------------------------------------------------------- the network as a run trains it
def build_network(cfg: Config, ctx, log) -> tuple[SimCLRModel, nn.Module]:
    """(model, model used for training): the seeded SimCLRModel on ctx.device, and DDP around it (compiled when
    cfg.compile). Identical init on every rank: seeded, then DDP broadcasts rank 0's weights and buffers."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if cfg.fine_tune_from:
        _load_fine_tune_weights(model, cfg.fine_tune_from, log)
    if cfg.step_mode == "checkpoint":
        enable_activation_checkpointing(model.backbone)
    synced = cfg.model.sync_bn and ctx.world_size > 1
    if synced:
        model = synchronize_batchnorm(model, cfg.model.sync_bn_impl, ctx.world_size, ctx.rank,
                                      cfg.model.sync_bn_group_size)
    model.to(ctx.device)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: pick cuDNN's fastest kernels once
    every_bn_global = synced and cfg.model.sync_bn_group_size in (0, ctx.world_size)
    ddp = DDP(model, device_ids=[ctx.device.index] if cuda else None,
              gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no second copy
              # the cached step runs several forwards per step under no_sync, which a static graph forbids
              static_graph=cfg.step_mode != "cached",
              # BN buffers are identical on every rank when every layer reduces over all ranks (or there is one
              # rank): nothing to send before each forward (the initial sync still starts every rank from rank 0's)
              forward_sync_buffers=ctx.world_size > 1 and not every_bn_global)
    return model, (torch.compile(ddp) if cfg.compile else ddp)


def _load_fine_tune_weights(model: SimCLRModel, source: str, log) -> None:
    """fine_tune_from: the backbone starts from a checkpoint's or an exported backbone's weights; a source that
    does not exist is reported and the backbone trains from scratch (the seed's behaviour)."""
    try:
        model.backbone.load_state_dict(load_backbone_weights(source))
        log.info(f"fine_tune_from={source}: backbone weights loaded")
    except FileNotFoundError as err:
        log.warn(f"{err}; training the backbone from scratch")


def random_init_backbone(cfg: Config, device: torch.device) -> nn.Module:
    """The backbone as the seeded initialization made it (the final probe's random-init reference), rebuilt
    without touching the RNG state the run continues with. Rebuilt rather than copied: a copy of the training
    model would carry its BatchNorm layers' process group, which cannot be copied."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model).backbone.to(device)
