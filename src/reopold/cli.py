"""The ``reopold`` command line: ``reopold train`` (the bundled demo without arguments) and ``reopold report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reopold.config import ConfigError, add_arguments, config_help, load_config
from reopold.train_config import TrainConfig

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reopold", description="Relaxed On-Policy Distillation (REOPOLD) of language models.",
        epilog="Run `reopold train --help` for every config key.",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="distill a teacher into a student (no arguments: the bundled CPU demo)",
        description="Distill a teacher into a student. Without --config the bundled demo config is used:\n"
        f"{DEMO_CONFIG}\nEvery key below overrides the config file, e.g. --algo.name rkl --run.steps 100.",
    )  # fmt: skip
    train.add_argument("--config", help="YAML config file (default: the bundled demo)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    train.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    add_arguments(train, TrainConfig)
    report = commands.add_parser("report", help="(re)write report.md and plots of a run folder")
    report.add_argument("run_dir")
    keys = commands.add_parser("keys", help="list every config key with its type, default and help")
    keys.set_defaults(command="keys")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "keys":
        print(config_help(TrainConfig))
        return 0
    if args.command == "report":
        from reopold.report import write_report

        print(write_report(args.run_dir))
        return 0
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        from reopold.run import resume_config, train

        overrides = [*args.overrides, *rest]
        if args.resume:
            config = resume_config(Path(args.resume), overrides)
        else:
            config = load_config(TrainConfig, args.config or DEMO_CONFIG, overrides)
        if args.show_config:
            import yaml

            from reopold.config import to_dict

            print(yaml.safe_dump(to_dict(config), sort_keys=False))
            return 0
        run_dir = train(config, resume=args.resume)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"reopold: error: {err}", file=sys.stderr)
        return 2
    print(f"done: {run_dir} (report: {run_dir / 'report.md'})")
    return 0
