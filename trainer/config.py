"""The run configuration: every key's type, default and help in one place, and the checks of its values.

Each section is a dataclass; each key a field whose metadata holds its help line (`python -m trainer.main
--help-config` prints them all) and whether the seed project's config.yaml had it. Keys with a fixed set of
values are `Literal` types: the check is written once (`_check_choices`), the choices once (the annotation).
Loading YAML files and dotted overrides, saving, and the help text live in trainer/config_load.py.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.sources import resolve_data_path


class ConfigError(ValueError):
    """A bad configuration value; the message names the key (or file) to change."""


def _key(default, text: str, *, seed: bool = False):
    """A config key with its default and help line; seed=True: the seed project's config.yaml had it."""
    return field(default=default, metadata={"help": text, "seed": seed})


def _section(cls, text: str):
    """A nested section (model., dataset., ...) with its one-line description."""
    return field(default_factory=cls, metadata={"help": text, "seed": False})


@functools.cache
def field_types(cls) -> dict:
    """{field name: resolved type} of a config dataclass, resolved once per class (the annotations are strings)."""
    return typing.get_type_hints(cls)


def literal_choices(hint) -> tuple:
    """The allowed values of a Literal[...] type; () for any other type."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _one_of(choices) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else str(choices[0])


def _check_choices(section, prefix: str) -> None:
    """Every Literal-typed key of `section` holds one of its choices (constructed directly or loaded)."""
    for name, hint in field_types(type(section)).items():
        choices, value = literal_choices(hint), getattr(section, name)
        if choices and value not in choices:
            raise ConfigError(f"{prefix}{name}={value!r}: choose {_one_of(choices)}")


def _at_least(section, prefix: str, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(section, name) < low:
            raise ConfigError(f"{prefix}{name}={getattr(section, name)}: must be >= {low}")


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    base_model: str = _key("resnet18", "backbone: torchvision's resnet18 | resnet34 | resnet50, or a small network "
                           "of trainer/small_nets.py (resnet8, resnet8_wide, resnet10, ...)", seed=True)
    out_dim: int = _key(128, "projection output dimension (the paper used 128; the seed 256)", seed=True)
    small_stem: bool = _key(False, "3x3 stride-1 first conv, no max-pool: for images of 32-96 px")
    head_layers: int = _key(2, "projection head depth (2 as SimCLR v1, 3 as v2)")
    sync_bn: bool = _key(True, "BatchNorm statistics over the global batch (all ranks), as the paper's global BN")
    sync_bn_impl: Literal["global", "torch"] = _key(
        "global", "global: trainer/global_bn.py (pure torch: CPU and CUDA, no host syncs); torch: nn.SyncBatchNorm "
        "(CUDA only, one device-to-host sync per layer per forward)")
    sync_bn_group_size: int = _key(0, "synchronize BatchNorm within groups of this many ranks (0: all ranks)")
    channels_last: bool = _key(True, "NHWC memory format for weights and inputs (the fast layout on CUDA)")

    def __post_init__(self):
        from trainer.small_nets import BACKBONES  # lazily: importing the config needs no torch
        names = ("resnet18", "resnet34", "resnet50", *BACKBONES)
        if self.base_model not in names:
            raise ConfigError(f"model.base_model={self.base_model!r}: choose one of {', '.join(names)}")
        _check_choices(self, "model.")
        _at_least(self, "model.", ("out_dim",), 1)
        if self.head_layers not in (2, 3):
            raise ConfigError(f"model.head_layers={self.head_layers}: must be 2 or 3")
        _at_least(self, "model.", ("sync_bn_group_size",), 0)


@dataclass
class DatasetConfig:
    name: Literal["digits", "synthetic", "cifar10", "cifar100", "stl10", "imagefolder"] = _key(
        "digits", "the data set (digits and synthetic need no files)")
    path: str = _key("", "data directory (loader=torchvision) or .beton file made by `python -m data.prepare` "
                     "(loader=ffcv); a relative path starting with datasets/ is under $SIMCLR_DATA when that is "
                     "set, else under ./datasets (data.sources.resolve_data_path)")
    split: str = _key("train", "for stl10: train | unlabeled | train+unlabeled (the seed's choice) | test")
    loader: Literal["memory", "torchvision", "ffcv"] = _key(
        "memory", "memory: digits and synthetic, held in memory; torchvision: PIL in DataLoader workers; ffcv: a "
        ".beton (decode + crop in FFCV)")
    s: float = _key(1.0, "color-jitter strength: brightness/contrast/saturation 0.8*s, hue 0.2*s", seed=True)
    input_shape: tuple[int, int, int] = _key(
        (32, 32, 3), "(height, width, channels) of the crops fed to the model, e.g. (96,96,3)", seed=True)
    num_workers: int = _key(0, "loader worker processes per rank", seed=True)
    valid_size: float = _key(0.05, "fraction of the training set held out for the validation loss", seed=True)
    jitter_prob: float = _key(0.8, "probability of the color jitter per view")
    grayscale_prob: float = _key(0.2, "probability of grayscale per view")
    blur_prob: float = _key(0.0, "probability of Gaussian blur per view (0.5 for ImageNet; off for CIFAR/STL10 as "
                            "the seed)")
    solarize_prob: float = _key(0.0, "probability of solarization per view (SimCLR v2 uses 0.2 on one view)")
    crop_min_scale: float = _key(0.08, "random-resized-crop area range (crop_min_scale, 1)")
    flip_prob: float = _key(0.5, "horizontal flip per view; 0 where mirroring changes the class (digits)")
    synthetic_size: int = _key(256, "number of images of the synthetic set (tests, benchmarks)")

    def __post_init__(self):
        self.input_shape = _parse_shape(self.input_shape)
        h, w, c = self.input_shape
        if h != w or c != 3 or h < 8:
            raise ConfigError(f"dataset.input_shape={self.input_shape}: use a square RGB shape such as (96,96,3)")
        _check_choices(self, "dataset.")
        if self.loader == "memory" and self.name not in ("digits", "synthetic"):
            raise ConfigError(f"dataset.loader=memory holds only digits or synthetic; use torchvision or ffcv for "
                              f"{self.name}")
        if self.name == "synthetic" and self.loader != "memory":
            raise ConfigError("dataset.name=synthetic exists only in memory: use dataset.loader=memory")
        if not 0.0 <= self.valid_size < 1.0:
            raise ConfigError(f"dataset.valid_size={self.valid_size}: must be in [0, 1)")
        _at_least(self, "dataset.", ("num_workers",), 0)
        for key in ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob", "flip_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"dataset.{key}={getattr(self, key)}: must be a probability in [0, 1]")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"dataset.crop_min_scale={self.crop_min_scale}: must be in (0, 1]")
        self.path = resolve_data_path(self.path)

    @property
    def image_size(self) -> int:
        return self.input_shape[0]


def _parse_shape(value) -> tuple:
    if isinstance(value, str):  # the seed writes "(96,96,3)"
        value = [v for v in value.strip().strip("()[]").split(",") if v.strip()]
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"dataset.input_shape={value!r}: expected (height, width, channels)") from None
    if len(shape) != 3:
        raise ConfigError(f"dataset.input_shape={value!r}: expected (height, width, channels)")
    return shape


@dataclass
class LossConfig:
    temperature: float = _key(0.5, "NT-Xent temperature (the paper: 0.1 at batch 4096+, 0.5 at small batch)",
                              seed=True)
    use_cosine_similarity: bool = _key(True, "cosine similarity of the projections; false: plain dot product",
                                       seed=True)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"loss.temperature={self.temperature}: must be > 0")


@dataclass
class OptimConfig:
    name: Literal["lars", "sgd", "adam", "adamw"] = _key("lars", "optimizer (the seed used adam with lr 3e-4: "
                                                         "optim.name=adam optim.base_lr=3e-4 optim.lr_scaling=none)")
    base_lr: float | None = _key(None, "scaled by the global batch (see lr_scaling); unset: the paper's 0.3 for "
                                 "linear scaling (peak 4.8 at batch 4096), 0.075 for sqrt (the same 4.8), 0.3 for none")
    lr_scaling: Literal["linear", "sqrt", "none"] = _key(
        "linear", "peak learning rate: linear base_lr*B/256 | sqrt base_lr*sqrt(B) | none base_lr (B: global batch)")
    weight_decay: float = _key(1e-6, "applied to weights with ndim >= 2 only")
    momentum: float = _key(0.9, "momentum of LARS and SGD (unused by adam and adamw)")
    trust_coefficient: float = _key(0.001, "LARS eta: the trust ratio's coefficient")
    warmup_epochs: float = _key(10.0, "linear warmup, then cosine decay to final_lr")
    final_lr: float = _key(0.0, "learning rate at the end of the cosine decay")
    grad_clip: float = _key(0.0, "max global gradient norm; 0 disables clipping")

    def __post_init__(self):
        _check_choices(self, "optim.")
        if self.base_lr is None:
            self.base_lr = 0.075 if self.lr_scaling == "sqrt" else 0.3
        for key in ("base_lr", "weight_decay", "warmup_epochs", "final_lr", "grad_clip", "trust_coefficient"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}={getattr(self, key)}: must be >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum={self.momentum}: must be in [0, 1)")

    def peak_lr(self, global_batch_size: int) -> float:
        if self.lr_scaling == "linear":
            return self.base_lr * global_batch_size / 256
        if self.lr_scaling == "sqrt":
            return self.base_lr * math.sqrt(global_batch_size)
        return self.base_lr


@dataclass
class EvalConfig:
    knn_monitor: bool = _key(True, "kNN accuracy on a labeled set every eval_every_n_epochs")
    knn_k: int = _key(200, "neighbours of the kNN monitor and of the final probe's kNN")
    knn_temperature: float = _key(0.1, "temperature of the kNN's similarity weights")
    final_probe: bool = _key(True, "at the end: linear probe + kNN of the learned vs a random-init backbone")
    test_fraction: float = _key(0.3, "held-out stratified fraction for the digits probe")

    def __post_init__(self):
        _at_least(self, "eval.", ("knn_k",), 1)
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"eval.test_fraction={self.test_fraction}: must be in (0, 1)")


@dataclass
class Config:
    batch_size: int = _key(256, "GLOBAL batch over all ranks (per rank: batch_size / world size)", seed=True)
    epochs: int = _key(100, "epochs of pretraining", seed=True)
    max_steps: int = _key(0, "stop after this many optimizer steps in total, schedule unchanged (0: epochs decide)")
    eval_every_n_epochs: int = _key(1, "validation loss (and kNN monitor) every this many epochs", seed=True)
    fine_tune_from: str | None = _key(None, "checkpoint file, run directory or run name under runs/ whose backbone "
                                      "weights start the run (absent: a warning, from scratch)", seed=True)
    log_every_n_steps: int = _key(50, "console / JSONL / TensorBoard interval; also the only host syncs", seed=True)
    checkpoint_every_n_steps: int = _key(0, "extra checkpoints within epochs (0: at epoch ends only)")
    keep_checkpoints: int = _key(3, "keep the last k checkpoints")
    output_dir: str = _key("runs/default", "checkpoints, TensorBoard events, logs; rerun to resume")
    seed: int = _key(0, "seed of the initialization, data order and augmentations")
    amp: Literal["auto", "bf16", "fp16", "off"] = _key(
        "auto", "mixed precision: auto (bf16 on CUDA where supported, else off) | bf16 | fp16 (loss scaling) | off")
    compile: bool = _key(False, "torch.compile the model (CUDA)")
    dist_timeout_s: int = _key(1800, "collective timeout: a dead or hung rank ends the job after this")
    device: Literal["auto", "cuda", "cpu"] = _key("auto", "auto: CUDA when available")
    step_mode: Literal["direct", "cached", "checkpoint"] = _key(
        "direct", "direct | cached (embedding-gradient caching) | checkpoint (activation checkpointing)")
    cached_chunk_size: int = _key(0, "views per chunk in step_mode=cached (0: chosen from free device memory)")
    model: ModelConfig = _section(ModelConfig, "the network: backbone, projection head, BatchNorm")
    dataset: DatasetConfig = _section(DatasetConfig, "the images and their augmentations")
    loss: LossConfig = _section(LossConfig, "NT-Xent")
    optim: OptimConfig = _section(OptimConfig, "optimizer and learning-rate schedule")
    eval: EvalConfig = _section(EvalConfig, "kNN monitor and final probe")

    def __post_init__(self):
        _at_least(self, "", ("batch_size", "epochs", "eval_every_n_epochs", "log_every_n_steps", "keep_checkpoints",
                             "dist_timeout_s"), 1)
        _at_least(self, "", ("max_steps", "checkpoint_every_n_steps"), 0)
        _check_choices(self, "")
        if self.cached_chunk_size < 0:
            raise ConfigError(f"cached_chunk_size={self.cached_chunk_size}: must be >= 0 (0: automatic)")
        if self.compile and self.step_mode == "checkpoint":  # dynamo cannot trace checkpoint's context_fn
            raise ConfigError("compile=true with step_mode=checkpoint: torch.compile cannot trace activation "
                              "checkpointing's BatchNorm-freezing context; use step_mode=cached (the large-batch "
                              "mode that compiles) or compile=false")

    # ------------------------------------------------------------------------- checks needing the world
    def validate(self, world_size: int) -> None:
        """Checks that need the launch environment; raised before any process group starts."""
        if self.batch_size % world_size:
            raise ConfigError(f"batch_size={self.batch_size} (global) is not divisible by the world size "
                              f"{world_size}: use a multiple of {world_size}")
        self._validate_data_path()
        import torch
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda but CUDA is not available: use device=auto or device=cpu")
        on_cpu = self.device == "cpu" or not torch.cuda.is_available()
        if self.model.sync_bn and self.model.sync_bn_impl == "torch" and world_size > 1 and on_cpu:
            raise ConfigError("model.sync_bn_impl=torch on the CPU: PyTorch's SyncBatchNorm has no CPU kernel; "
                              "use model.sync_bn_impl=global (the default) or model.sync_bn=false")
        if self.model.sync_bn_group_size > 1 and world_size % self.model.sync_bn_group_size:
            raise ConfigError(f"model.sync_bn_group_size={self.model.sync_bn_group_size} does not divide the world "
                              f"size {world_size}")

    def _validate_data_path(self) -> None:
        d = self.dataset
        if d.loader == "ffcv" and d.path and not d.path.endswith(".beton"):
            raise ConfigError(f"dataset.path={d.path}: dataset.loader=ffcv reads a .beton file made by "
                              "`python -m data.prepare`")
        if d.name in ("digits", "synthetic") and d.loader != "ffcv":
            return
        if not d.path:
            raise ConfigError(f"dataset.path is empty: dataset.name={d.name} with loader={d.loader} needs a data "
                              "directory or .beton file")
        if not Path(d.path).exists():
            raise ConfigError(f"dataset.path={d.path}: no such file or directory")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
