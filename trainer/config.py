"""Typed run configuration: every default in one place, YAML overrides, dotted key=value overrides, validation."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false (so `amp: off` stays the string 'off'); 1e-6 reads as a float."""


_Yaml12Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "tTfF":
    _Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                        [_first])
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"), list("-+.0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


class ConfigError(ValueError):
    """A bad configuration value; the message names the key (or file) to change."""


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    base_model: str = "resnet18"  # torchvision backbone: resnet18 | resnet34 | resnet50
    out_dim: int = 128  # projection output dimension (the paper used 128; the seed 256)
    small_stem: bool = False  # 3x3 stride-1 first conv, no max-pool: for images of 32-96 px
    head_layers: int = 2  # projection head depth (2 as SimCLR v1, 3 as v2)
    sync_bn: bool = True  # BatchNorm statistics over the global batch (all ranks), as the SimCLR paper's global BN
    sync_bn_impl: str = "global"  # global: trainer/global_bn.py (pure torch: CPU and CUDA, no host syncs) |
    # torch: nn.SyncBatchNorm (CUDA only, one device-to-host sync per layer per forward)
    sync_bn_group_size: int = 0  # synchronize BN within groups of this many ranks (0: all ranks)
    channels_last: bool = True  # NHWC memory format (CUDA only)

    def __post_init__(self):
        from trainer.small_nets import BACKBONES
        names = ("resnet18", "resnet34", "resnet50", *BACKBONES)
        if self.base_model not in names:
            raise ConfigError(f"model.base_model={self.base_model!r}: choose one of {', '.join(names)}")
        if self.out_dim < 1:
            raise ConfigError(f"model.out_dim={self.out_dim}: must be >= 1")
        if self.head_layers not in (2, 3):
            raise ConfigError(f"model.head_layers={self.head_layers}: must be 2 or 3")
        if self.sync_bn_impl not in ("global", "torch"):
            raise ConfigError(f"model.sync_bn_impl={self.sync_bn_impl!r}: choose global or torch")
        if self.sync_bn_group_size < 0:
            raise ConfigError(f"model.sync_bn_group_size={self.sync_bn_group_size}: must be >= 0")


@dataclass
class DatasetConfig:
    name: str = "digits"  # digits | synthetic | cifar10 | cifar100 | stl10 | imagefolder
    path: str = ""  # data directory, or a prepared .beton file for loader=ffcv
    split: str = "train"  # for stl10: train | unlabeled | train+unlabeled (the seed's choice) | test
    loader: str = "memory"  # memory (digits, synthetic) | torchvision | ffcv
    s: float = 1.0  # color-jitter strength: brightness/contrast/saturation 0.8*s, hue 0.2*s
    input_shape: tuple = (32, 32, 3)  # (height, width, channels) of the crops fed to the model
    num_workers: int = 0  # loader worker processes per rank
    valid_size: float = 0.05  # fraction of the training set held out for the validation loss
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0  # 0.5 for ImageNet; off for CIFAR/STL10 as the seed
    solarize_prob: float = 0.0  # SimCLR v2 uses 0.2 on one view
    crop_min_scale: float = 0.08  # random-resized-crop area range (crop_min_scale, 1)
    flip_prob: float = 0.5  # horizontal flip per view; 0 where mirroring changes the class (digits)
    synthetic_size: int = 256  # number of images of the synthetic set (tests, benchmarks)

    def __post_init__(self):
        self.input_shape = _parse_shape(self.input_shape)
        h, w, c = self.input_shape
        if h != w or c != 3 or h < 8:
            raise ConfigError(f"dataset.input_shape={self.input_shape}: use a square RGB shape such as (96,96,3)")
        names = ("digits", "synthetic", "cifar10", "cifar100", "stl10", "imagefolder")
        if self.name not in names:
            raise ConfigError(f"dataset.name={self.name!r}: choose one of {', '.join(names)}")
        if self.loader not in ("memory", "torchvision", "ffcv"):
            raise ConfigError(f"dataset.loader={self.loader!r}: choose memory, torchvision or ffcv")
        if self.loader == "memory" and self.name not in ("digits", "synthetic"):
            raise ConfigError(f"dataset.loader=memory holds only digits or synthetic; use torchvision or ffcv for {self.name}")
        if self.name == "synthetic" and self.loader != "memory":
            raise ConfigError("dataset.name=synthetic exists only in memory: use dataset.loader=memory")
        if not 0.0 <= self.valid_size < 1.0:
            raise ConfigError(f"dataset.valid_size={self.valid_size}: must be in [0, 1)")
        if self.num_workers < 0:
            raise ConfigError(f"dataset.num_workers={self.num_workers}: must be >= 0")
        for key in ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob", "flip_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"dataset.{key}={getattr(self, key)}: must be a probability in [0, 1]")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"dataset.crop_min_scale={self.crop_min_scale}: must be in (0, 1]")

    @property
    def image_size(self) -> int:
        return self.input_shape[0]


@dataclass
class LossConfig:
    temperature: float = 0.5  # NT-Xent temperature (the paper: 0.1 at batch 4096+, 0.5 at small batch)
    use_cosine_similarity: bool = True  # False: plain dot product of the projections

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"loss.temperature={self.temperature}: must be > 0")


@dataclass
class OptimConfig:
    name: str = "lars"  # lars | sgd | adam | adamw (the seed used adam with lr 3e-4)
    base_lr: float | None = None  # scaled by the global batch (see lr_scaling); unset: the paper's 0.3 for
    # linear scaling (peak 4.8 at batch 4096), 0.075 for sqrt (the same 4.8 at 4096), 0.3 for none
    lr_scaling: str = "linear"  # linear: base_lr*B/256 | sqrt: base_lr*sqrt(B) | none: base_lr
    weight_decay: float = 1e-6  # applied to weights with ndim >= 2 only
    momentum: float = 0.9
    trust_coefficient: float = 0.001  # LARS eta
    warmup_epochs: float = 10.0  # linear warmup, then cosine decay to final_lr
    final_lr: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping

    def __post_init__(self):
        if self.name not in ("lars", "sgd", "adam", "adamw"):
            raise ConfigError(f"optim.name={self.name!r}: choose lars, sgd, adam or adamw")
        if self.lr_scaling not in ("linear", "sqrt", "none"):
            raise ConfigError(f"optim.lr_scaling={self.lr_scaling!r}: choose linear, sqrt or none")
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
    knn_monitor: bool = True  # kNN accuracy on a labeled set every eval_every_n_epochs
    knn_k: int = 200
    knn_temperature: float = 0.1
    final_probe: bool = True  # at the end: linear probe + kNN of the learned vs a random-init backbone
    test_fraction: float = 0.3  # held-out stratified fraction for the digits probe

    def __post_init__(self):
        if self.knn_k < 1:
            raise ConfigError(f"eval.knn_k={self.knn_k}: must be >= 1")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"eval.test_fraction={self.test_fraction}: must be in (0, 1)")


@dataclass
class Config:
    batch_size: int = 256  # GLOBAL batch over all ranks (per rank = batch_size / world size)
    epochs: int = 100
    max_steps: int = 0  # stop after this many optimizer steps in total (0: epochs decide)
    eval_every_n_epochs: int = 1  # validation loss (and kNN monitor) every this many epochs
    fine_tune_from: str | None = None  # checkpoint file or run directory whose backbone weights start the run
    log_every_n_steps: int = 50  # console / JSONL / TensorBoard interval; also the only host syncs
    checkpoint_every_n_steps: int = 0  # extra checkpoints within epochs (0: at epoch ends only)
    keep_checkpoints: int = 3  # keep the last k checkpoints
    output_dir: str = "runs/default"  # checkpoints, TensorBoard events, logs; rerun to resume
    seed: int = 0
    amp: str = "auto"  # auto (bf16 on CUDA where supported, else off) | bf16 | fp16 | off
    compile: bool = False  # torch.compile the model (CUDA)
    dist_timeout_s: int = 1800  # collective timeout: a dead or hung rank ends the job after this
    device: str = "auto"  # auto (CUDA when available) | cuda | cpu
    step_mode: str = "direct"  # direct | cached (embedding-gradient caching) | checkpoint (activation checkpointing)
    cached_chunk_size: int = 0  # views per chunk in step_mode=cached (0: chosen from free device memory)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        for key in ("batch_size", "epochs", "eval_every_n_epochs", "log_every_n_steps", "keep_checkpoints",
                    "dist_timeout_s"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 1")
        for key in ("max_steps", "checkpoint_every_n_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"amp={self.amp!r}: choose auto, bf16, fp16 or off")
        if self.step_mode not in ("direct", "cached", "checkpoint"):
            raise ConfigError(f"step_mode={self.step_mode!r}: choose direct, cached or checkpoint")
        if self.cached_chunk_size < 0:
            raise ConfigError(f"cached_chunk_size={self.cached_chunk_size}: must be >= 0 (0: automatic)")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"device={self.device!r}: choose auto, cuda or cpu")
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
        needs_path = self.dataset.name not in ("digits", "synthetic") or self.dataset.loader == "ffcv"
        if self.dataset.loader == "ffcv" and self.dataset.path and not self.dataset.path.endswith(".beton"):
            raise ConfigError(f"dataset.path={self.dataset.path}: dataset.loader=ffcv reads a .beton file made by "
                              "`python -m data.prepare`")
        if needs_path:
            if not self.dataset.path:
                raise ConfigError(f"dataset.path is empty: dataset.name={self.dataset.name} with "
                                  f"loader={self.dataset.loader} needs a data directory or .beton file")
            if not Path(self.dataset.path).exists():
                raise ConfigError(f"dataset.path={self.dataset.path}: no such file or directory")
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading
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


def _coerce(key: str, value: Any, annotation) -> Any:
    """Checks one value against its field type; ints are accepted for floats."""
    hint = annotation
    if isinstance(hint, str):
        hint = eval(hint, {**vars(typing), "tuple": tuple})  # postponed annotations (from __future__)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if hint is tuple or typing.get_origin(hint) is tuple:
        return value  # parsed by the section's __post_init__
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}={value!r}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")


def _build(cls, values: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = [name for name in fields if name.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of {dotted}.* keys, got {value!r}")
            kwargs[key] = _build(sub, value, prefix=f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, fields[key].type)
    for name, f in fields.items():  # nested sections not mentioned still need building
        if name not in kwargs and f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[name] = f.default_factory()
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """['optim.base_lr=0.1', 'epochs=2'] -> {'optim': {'base_lr': 0.1}, 'epochs': 2} (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides; raises ConfigError naming the key or file."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            choices = ", ".join(sorted(p.name for p in path.glob("*.yaml"))) or "no .yaml files there"
            raise ConfigError(f"config file {path}: a directory, not a file ({choices})")
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            loaded = _yaml_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of keys at the top level")
        values = loaded or {}
    values = _merge(values, parse_overrides(list(overrides)))
    return _build(Config, values)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    data = cfg.to_dict()
    data["dataset"]["input_shape"] = list(cfg.dataset.input_shape)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
