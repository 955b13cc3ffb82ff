"""Entry point: `torchrun --nproc_per_node=N -m trainer.main --config FILE [dotted.key=value ...]`.

`python -m trainer.main --help-config [--config FILE] [key=value ...]` lists every config key instead of training.
"""
from __future__ import annotations

import argparse
import sys

from trainer import distributed
from trainer.config import ConfigError
from trainer.config_load import config_help, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.main",
        description="SimCLR pretraining. Launch with torchrun for several processes; rerunning the same "
                    "command with the same output_dir resumes from its latest checkpoint.",
        epilog="Overrides: dotted keys of the config, e.g. batch_size=512 optim.base_lr=0.3 "
               "loss.temperature=0.2 output_dir=runs/x (batch_size is the GLOBAL batch).")
    parser.add_argument("--config", help="YAML file of overrides to the defaults (configs/*.yaml)")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key (type, default, help; the seed's keys marked) and exit; with "
                             "--config or overrides, also the values they set")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = distributed.world_from_env()
    try:  # every configuration error is raised here, before any process group starts
        cfg = load_config(args.config, args.overrides)
        if args.help_config:
            print(config_help(cfg if args.config or args.overrides else None), end="")
            return 0
        cfg.validate(world.world_size)
    except ConfigError as err:
        if world.is_main:
            print(f"config error: {err}", file=sys.stderr)
        return 2
    from trainer.checkpoint import ResumeError
    from trainer.engine import NonFiniteLossError, run  # heavy imports after the config is known good

    with distributed.process_group(world, cfg.device, cfg.dist_timeout_s) as ctx:
        try:
            run(cfg, ctx)
        except ResumeError as err:  # raised on every rank alike, before any training step
            if ctx.is_main:
                print(f"error: {err}", file=sys.stderr)
            return 2
        except NonFiniteLossError as err:
            if ctx.is_main:
                print(f"error: {err}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
