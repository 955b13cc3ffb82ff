"""Config: defaults, YAML and dotted overrides, the seed's block, and errors that name the key or file."""
from pathlib import Path

import pytest
import yaml

from data.sources import resolve_data_path
from trainer.config import Config, ConfigError, ModelConfig, OptimConfig
from trainer.config_load import load_config, parse_overrides, save_config

SEED_CONFIG = Path(__file__).parents[1] / "fixtures" / "seed_config.yaml"
CONFIGS = Path(__file__).parents[2] / "configs"


def test_seed_block_loads_as_is_and_each_key_lands():
    cfg = load_config(SEED_CONFIG)
    assert cfg.batch_size == 512 and cfg.epochs == 40 and cfg.eval_every_n_epochs == 1
    assert cfg.fine_tune_from == "Mar13_20-12-09_thallessilva" and cfg.log_every_n_steps == 50
    assert cfg.model.out_dim == 256 and cfg.model.base_model == "resnet18"
    assert cfg.dataset.s == 1.0 and cfg.dataset.input_shape == (96, 96, 3) and cfg.dataset.image_size == 96
    assert cfg.dataset.num_workers == 0 and cfg.dataset.valid_size == 0.05
    assert cfg.loss.temperature == 0.5 and cfg.loss.use_cosine_similarity is True


def test_seed_keys_work_as_overrides():
    cfg = load_config(SEED_CONFIG, ["epochs=1", "batch_size=64", "loss.temperature=0.2", "output_dir=runs/x",
                                    "dataset.input_shape=(32,32,3)", "loss.use_cosine_similarity=false"])
    assert (cfg.epochs, cfg.batch_size, cfg.loss.temperature, cfg.output_dir) == (1, 64, 0.2, "runs/x")
    assert cfg.dataset.input_shape == (32, 32, 3) and cfg.loss.use_cosine_similarity is False
    assert cfg.model.out_dim == 256  # the file's value survives other overrides


def test_override_precedence_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  base_lr: 0.5\n  name: sgd\n")
    cfg = load_config(path, ["optim.base_lr=0.1"])
    assert cfg.optim.base_lr == 0.1 and cfg.optim.name == "sgd" and cfg.optim.momentum == Config().optim.momentum


@pytest.mark.parametrize("overrides,named", [
    (["learning_rate=0.1"], "learning_rate"),
    (["optim.base_lr_typo=0.1"], "optim.base_lr_typo"),
    (["loss.temperature=hot"], "loss.temperature"),
    (["epochs=1.5"], "epochs"),
    (["model.sync_bn=maybe"], "model.sync_bn"),
    (["loss.temperature=0"], "loss.temperature"),
    (["dataset.input_shape=(96,3)"], "dataset.input_shape"),
    (["amp=fp8"], "amp"),
    (["optim.name=rmsprop"], "optim.name"),
    (["model=resnet18"], "model"),
    (["batch_size"], "batch_size"),
    (["dataset.flip_prob=1.5"], "dataset.flip_prob"),
    (["dataset.crop_min_scale=0"], "dataset.crop_min_scale"),
    (["model.sync_bn_impl=apex"], "model.sync_bn_impl"),
])
def test_bad_values_name_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, overrides)


def test_compile_with_activation_checkpointing_is_refused_naming_both_keys():
    # torch.compile cannot trace the checkpoint's BN-freezing context_fn: refused before anything starts
    with pytest.raises(ConfigError, match="compile=true with step_mode=checkpoint"):
        load_config(None, ["compile=true", "step_mode=checkpoint"])
    assert load_config(None, ["compile=true", "step_mode=cached"]).compile


def test_pytorch_sync_batchnorm_on_cpu_is_refused(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["model.sync_bn_impl=torch"])
    cfg.validate(world_size=1)  # one rank: nothing to synchronize
    with pytest.raises(ConfigError, match="model.sync_bn_impl=torch.*no CPU kernel"):
        cfg.validate(world_size=2)
    load_config(None, ["model.sync_bn_impl=global"]).validate(world_size=2)


def test_batch_not_divisible_by_world_size():
    cfg = load_config(None, ["batch_size=10"])
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="batch_size=10.*world size 4"):
        cfg.validate(world_size=4)


def test_missing_data_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    cfg = load_config(None, ["dataset.name=stl10", "dataset.loader=torchvision", f"dataset.path={missing}"])
    with pytest.raises(ConfigError, match="dataset.path=.*nowhere"):
        cfg.validate(world_size=1)
    with pytest.raises(ConfigError, match="dataset.path"):
        load_config(None, ["dataset.name=cifar10", "dataset.loader=torchvision"]).validate(1)


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="absent.yaml"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"a directory, not a file \(broken.yaml\)"):
        load_config(tmp_path)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.base_lr=0.05", "dataset.input_shape=(64,64,3)"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["base_lr"] == 0.05


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=true", "d=1e-3", "e=runs/x"]) == {
        "a": {"b": 1, "c": True}, "d": 1e-3, "e": "runs/x"}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_round_trip(name, tmp_path, monkeypatch):
    monkeypatch.delenv("SIMCLR_DATA", raising=False)
    cfg = load_config(CONFIGS / name)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    # data sets are named under datasets/, never inside the Python package data/
    assert cfg.dataset.path == "" or Path(cfg.dataset.path).parts[0] == "datasets"


# ----------------------------------------------------------------------------- keys with a fixed set of values
@pytest.mark.parametrize("key, choices", [
    ("amp", "auto, bf16, fp16 or off"),
    ("device", "auto, cuda or cpu"),
    ("step_mode", "direct, cached or checkpoint"),
    ("model.sync_bn_impl", "global or torch"),
    ("dataset.name", "digits, synthetic, cifar10, cifar100, stl10 or imagefolder"),
    ("dataset.loader", "memory, torchvision or ffcv"),
    ("optim.name", "lars, sgd, adam or adamw"),
    ("optim.lr_scaling", "linear, sqrt or none"),
])
def test_a_value_outside_the_choices_names_the_key_and_every_choice(key, choices):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=bogus"])
    assert str(err.value) == f"{key}='bogus': choose {choices}"
    for choice in choices.replace(" or ", ", ").split(", "):  # each choice named is accepted
        files = [] if choice in ("digits", "synthetic") or key != "dataset.name" else ["dataset.loader=torchvision"]
        cfg = load_config(None, [f"{key}={choice}", *files])
        section, _, name = key.rpartition(".")
        assert getattr(getattr(cfg, section) if section else cfg, name) == choice


def test_sections_built_in_code_check_their_choices_too():
    with pytest.raises(ConfigError, match=r"^optim\.name='rmsprop': choose lars, sgd, adam or adamw$"):
        OptimConfig(name="rmsprop")
    with pytest.raises(ConfigError, match=r"^model\.sync_bn_impl='apex': choose global or torch$"):
        ModelConfig(sync_bn_impl="apex")
    with pytest.raises(ConfigError, match=r"^amp='fp8'"):
        Config(amp="fp8")
    assert OptimConfig(name="adamw").name == "adamw"


def test_a_number_for_a_choice_is_refused_as_a_string():
    with pytest.raises(ConfigError, match=r"^amp='16': choose auto"):
        load_config(None, ["amp=16"])
    with pytest.raises(ConfigError, match=r"^device=True: expected str, got bool"):
        load_config(None, ["device=true"])


# ----------------------------------------------------------------------------- where the data sets are
def test_datasets_paths_stay_as_written_without_simclr_data(monkeypatch):
    monkeypatch.delenv("SIMCLR_DATA", raising=False)
    for path in ("datasets/stl10/train.beton", "data/stl10", "/abs/imagenet", "", None):
        assert resolve_data_path(path) == path


def test_simclr_data_is_the_root_of_datasets_paths_only(monkeypatch, tmp_path):
    root = tmp_path / "disk"
    monkeypatch.setenv("SIMCLR_DATA", str(root))
    assert resolve_data_path("datasets/stl10/train.beton") == str(root / "stl10" / "train.beton")
    assert resolve_data_path("./datasets/cifar10") == str(root / "cifar10")
    assert resolve_data_path("datasets") == str(root)
    for as_written in ("data/stl10", "my_datasets/x", "/abs/datasets/x", "runs/datasets", ""):
        assert resolve_data_path(as_written) == as_written
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMCLR_DATA", "disk")  # a relative root is the working directory's, made absolute
    once = resolve_data_path("datasets/stl10")
    assert once == str(root / "stl10") and resolve_data_path(once) == once


def test_dataset_path_follows_the_rule_and_the_resolved_path_is_saved(monkeypatch, tmp_path):
    root = tmp_path / "disk"
    (root / "stl10").mkdir(parents=True)
    (root / "stl10" / "train.beton").touch()
    monkeypatch.setenv("SIMCLR_DATA", str(root))
    overrides = ["dataset.name=stl10", "dataset.loader=ffcv", "dataset.path=datasets/stl10/train.beton"]
    cfg = load_config(None, overrides)
    assert cfg.dataset.path == str(root / "stl10" / "train.beton")
    cfg.validate(world_size=1)  # found under the root, not under ./datasets
    save_config(cfg, tmp_path / "config.yaml")
    monkeypatch.setenv("SIMCLR_DATA", str(tmp_path / "elsewhere"))  # the saved path is absolute: it stays
    assert load_config(tmp_path / "config.yaml") == cfg
    monkeypatch.delenv("SIMCLR_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"dataset\.path=datasets/stl10/train\.beton: no such file"):
        load_config(None, overrides).validate(world_size=1)
    (tmp_path / "datasets").symlink_to(root)  # ./datasets, the default root
    load_config(None, overrides).validate(world_size=1)
