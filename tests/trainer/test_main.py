"""The entry point without training: argument and config errors name the problem and start nothing;
--help-config lists every key with a default that reads back as the default, the seed's keys marked."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from trainer import distributed
from trainer.config import Config
from trainer.config_load import load_config
from trainer.main import main

REPO = Path(__file__).parents[2]
SEED_CONFIG = REPO / "tests" / "fixtures" / "seed_config.yaml"


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    """A single process, and a process group that must never start: every test here ends before training."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SIMCLR_DATA"):
        monkeypatch.delenv(name, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a process group was started")
    monkeypatch.setattr(distributed, "process_group", refuse)


def leaf_keys(cls, prefix=""):
    """Dotted names of every non-section field of a config dataclass, in declaration order."""
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            keys += leaf_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def flat_keys(tree, prefix=""):
    return [k for key, value in tree.items()
            for k in (flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]


def key_lines(text):
    """{dotted key: (type, default text, seed marked, value in use or None)} from the --help-config lines
    `  key: type = default[ *][   [in use: value]]` (help lines are indented deeper)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            key, rest = line.strip().split(": ", 1)
            type_text, default = rest.split(" = ", 1)
            default, _, in_use = default.partition("   [in use: ")
            rows[key] = (type_text, default.removesuffix(" *"), default.endswith(" *"), in_use[:-1] or None)
    return rows


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def help_text(capsys, *args):
    assert main(["--help-config", *args]) == 0
    out = capsys.readouterr().out
    return out, key_lines(out)


def test_help_config_lists_every_key_once_in_declaration_order(capsys):
    out, rows = help_text(capsys)
    assert list(rows) == leaf_keys(Config)
    # sections are headed in the order Config declares them, each key under its own section
    headings = [line.split(":")[0] for line in out.splitlines() if line and not line.startswith(" ")][1:]
    sections = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]
    assert [h for h in headings if h in sections] == sections
    assert "[in use:" not in out  # no --config and no overrides: nothing differs from the defaults


def test_each_printed_default_reads_back_as_the_default(capsys):
    """The printed default, given back as an override, builds the default config: the text is the true default."""
    _, rows = help_text(capsys)
    default = Config()
    for key, (_, printed, _, _) in rows.items():
        assert get(load_config(None, [f"{key}={printed}"]), key) == get(default, key), key


def test_types_and_help_are_shown(capsys):
    out, rows = help_text(capsys)
    assert rows["amp"][0] == "auto | bf16 | fp16 | off"
    assert rows["optim.base_lr"][0] == "float or null" and rows["dataset.input_shape"][0] == "(int,int,int)"
    assert rows["batch_size"][0] == "int" and rows["model.sync_bn"][0] == "bool"
    lines = out.splitlines()
    help_of_batch = lines[lines.index(next(line for line in lines if line.startswith("  batch_size:"))) + 1]
    assert "GLOBAL batch" in help_of_batch
    assert "SIMCLR_DATA" in out  # dataset.path's help states where datasets/... points


def test_the_seed_keys_and_only_those_are_marked(capsys):
    _, rows = help_text(capsys)
    seed_keys = flat_keys(yaml.safe_load(SEED_CONFIG.read_text()))
    assert len(seed_keys) == 13
    assert sorted(key for key, (_, _, marked, _) in rows.items() if marked) == sorted(seed_keys)


def test_help_config_with_a_config_shows_the_values_it_sets(capsys):
    quickstart = REPO / "configs" / "quickstart.yaml"
    out, rows = help_text(capsys, "--config", str(quickstart), "seed=3")
    cfg = load_config(quickstart, ["seed=3"])
    changed = [key for key, row in rows.items() if row[3] is not None]
    assert changed == [key for key in leaf_keys(Config) if get(cfg, key) != get(Config(), key)]
    for key in changed:  # the value in use, read back as an override, is the loaded config's
        assert get(load_config(None, [f"{key}={rows[key][3]}"]), key) == get(cfg, key), key
    assert "  model.base_model: str = resnet18 *   [in use: resnet10]" in out.splitlines()


@pytest.mark.parametrize("argv, named", [
    (["epochs"], "override 'epochs': expected dotted.key=value"),
    (["learning_rate=0.1"], "unknown config key 'learning_rate'"),
    (["--config", "no/such.yaml"], "config file no/such.yaml: not found"),
    (["amp=fp8"], "amp='fp8': choose auto, bf16, fp16 or off"),
    (["--help-config", "optim.name=rmsprop"], "optim.name='rmsprop': choose lars, sgd, adam or adamw"),
    (["dataset.name=cifar10", "dataset.loader=torchvision"], "dataset.path is empty"),
])
def test_config_errors_exit_2_naming_the_problem(capsys, argv, named):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert f"config error: {named}" in captured.err and captured.out == ""


@pytest.mark.parametrize("argv, named", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--config"], "argument --config: expected one argument"),
])
def test_argument_errors_exit_2_naming_the_argument(capsys, argv, named):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and named in capsys.readouterr().err


def test_world_size_check_and_only_rank_0_reports(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["batch_size=256"]) == 2
    assert "batch_size=256 (global) is not divisible by the world size 3" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    assert main(["batch_size=256"]) == 2
    assert capsys.readouterr().err == ""  # every rank exits 2; one message for the job


def test_missing_data_under_simclr_data_names_the_resolved_path(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SIMCLR_DATA", str(tmp_path))
    argv = ["dataset.name=stl10", "dataset.loader=ffcv", "dataset.path=datasets/stl10/train.beton"]
    assert main(argv) == 2
    assert f"dataset.path={tmp_path / 'stl10' / 'train.beton'}: no such file or directory" in capsys.readouterr().err
