"""The memory planner: saved-activation accounting against a hand count, and the CLI's verdicts."""
from pathlib import Path

import pytest
import torch.nn as nn

from trainer.plan import main, parse_bytes, saved_bytes_per_view

CONFIGS = Path(__file__).parents[2] / "configs"


def test_saved_bytes_match_hand_count():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU())
    size = 8
    per_view, _ = saved_bytes_per_view(model, size, amp_dtype=None)
    # conv keeps its input (3 x 8 x 8 fp32 per view) and its weight (shared by the 2 probe views);
    # ReLU keeps its output (4 x 8 x 8 fp32 per view)
    expected = (3 + 4) * size * size * 4 + conv.weight.numel() * 4 / 2
    assert per_view == pytest.approx(expected)


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 2 ** 30 and parse_bytes("512MiB") == 512 * 2 ** 20
    with pytest.raises(ValueError, match="--device-memory"):
        parse_bytes("lots")


def test_cli_r50_8192_one_node(capsys):
    assert main(["--config", str(CONFIGS / "imagenet_r50_b8192_1node.yaml"), "--world-size", "8",
                 "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "2048 views per device" in out
    assert "step_mode=direct     peak" in out and "does NOT fit" in out.split("step_mode=direct")[1].split("\n")[0]
    assert "fits in 80GB" in out.split("step_mode=cached")[1].split("\n")[0]
    assert main(["--config", str(CONFIGS / "quickstart.yaml"), "--world-size", "3"]) == 2
