"""The ``reopold`` command line: ``reopold train`` (the bundled demo without arguments) and ``reopold report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reopold import benchmark, teacher_server
from reopold.config import ConfigError, add_arguments, config_help, load_config
from reopold.eval_command import COMMANDS as EVAL_COMMANDS
from reopold.eval_command import add_commands as add_eval_commands
from reopold.eval_command import run_command as run_eval_command
from reopold.remote_teacher import TeacherUnavailable
from reopold.train_config import TrainConfig
from reopold.trainer import TrainingStopped

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
    merge = commands.add_parser("merge", help="fold a LoRA checkpoint into its base model (plain HF model folder)")
    merge.add_argument("checkpoint", help="a checkpoint folder or a run folder (its latest checkpoint)")
    merge.add_argument("output", help="folder to write the merged model to")
    merge.add_argument("--base", help="base model (default: the one recorded in adapter_config.json)")
    teacher_server.add_command(commands)
    benchmark.add_command(commands)
    keys = commands.add_parser("keys", help="list every config key with its type, default and help")
    keys.set_defaults(command="keys")
    add_eval_commands(commands)
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
    if args.command == "benchmark":
        return benchmark.run_command(args)
    if args.command == "serve-teacher":
        return teacher_server.run_command(args)
    if args.command == "merge":
        return merge_command(args)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in EVAL_COMMANDS:
        return run_eval_command(args)
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
    except (TrainingStopped, TeacherUnavailable) as err:
        print(f"reopold: stopped: {err}", file=sys.stderr)
        return 1
    print(f"done: {run_dir} (report: {run_dir / 'report.md'})")
    return 0


def merge_command(args) -> int:
    from reopold.checkpoint import latest_checkpoint
    from reopold.models import merge_adapter

    checkpoint = Path(args.checkpoint)
    if (checkpoint / "checkpoints").is_dir():
        checkpoint = latest_checkpoint(checkpoint) or checkpoint
    try:
        print(merge_adapter(checkpoint, args.output, base=args.base))
    except FileNotFoundError as err:
        print(f"reopold: error: {err}", file=sys.stderr)
        return 2
    return 0
