"""The console scripts: the installed ones are those setup.cfg declares, and each target parses the arguments it
is given (not the test runner's) and names what is wrong with them."""
import configparser
import importlib
from importlib.metadata import distribution
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


def test_installed_console_scripts_are_the_declared_ones():
    """A setup.cfg changed since the install leaves stale commands behind: the installed set must be the same."""
    installed = {entry.name: entry.value for entry in distribution("simclr-trainer").entry_points
                 if entry.group == "console_scripts"}
    assert installed == console_scripts(), "run bash launch/install.sh to install the declared console scripts"


# the arguments of each command that argparse must refuse, and what its message must name
WRONG_ARGUMENTS = {
    "simclr-train": (["--config", "c.yaml", "--epochs=3"], "unrecognized arguments: --epochs=3"),
    "simclr-export": (["run/checkpoint.pt"], "the following arguments are required: out"),
    "simclr-eval": (["--dataset", "digits"], "the following arguments are required: --checkpoint"),
    "simclr-finetune": (["--epochs", "1"], "the following arguments are required: --fine-tune-from"),
    "simclr-prepare": (["--out", "x.beton"], "the following arguments are required: --dataset"),
}


def test_every_console_script_has_a_wrong_arguments_case():
    assert set(WRONG_ARGUMENTS) == set(console_scripts())


@pytest.mark.parametrize("name", sorted(WRONG_ARGUMENTS))
def test_console_script_names_the_wrong_argument(name, capsys):
    module, func = console_scripts()[name].split(":")
    main = getattr(importlib.import_module(module), func)
    argv, message = WRONG_ARGUMENTS[name]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2  # argparse's usage error, before any work starts
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: "), err
