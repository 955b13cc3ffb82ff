"""Every console script declared in setup.cfg points at a main(argv) that parses --help and exits 0."""
import configparser
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_every_tool_has_a_console_script():
    targets = set(console_scripts().values())
    for module in ("trainer.main", "trainer.eval", "trainer.finetune", "trainer.export", "data.prepare"):
        assert f"{module}:main" in targets, f"{module} has no console script in setup.cfg"


@pytest.mark.parametrize("name,target", sorted(console_scripts().items()))
def test_console_script_target_runs_help(name, target, capsys):
    module, func = target.split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
