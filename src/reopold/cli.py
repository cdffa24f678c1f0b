"""The ``reopold`` command. Sub-commands are parsed here and their modules imported only when they run, so
``reopold --help`` and config errors never load torch; every sub-command's errors leave through ``main``'s one
mapping to a one-line message and an exit code (2: bad input, 1: stopped, 130: interrupted)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from reopold.config.loader import ConfigError, add_arguments, config_help, load_config
from reopold.config.schema import TrainConfig
from reopold.errors import TeacherUnavailable, TrainingStopped

CONFIG_DIR = Path(__file__).parent / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
TRAIN_STACK = {"transformers", "accelerate", "peft", "datasets", "safetensors", "tokenizers", "tqdm", "matplotlib"}
BAD_INPUT = (ConfigError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError, KeyError)


def bundled_configs() -> dict[str, Path]:
    """Configs shipped with the package, by name (``--config demo``)."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


def config_path(name: str | None) -> Path:
    """A config file, or the name of a bundled one; None is the demo."""
    if name is None:
        return DEMO_CONFIG
    bundled = bundled_configs()
    if name in bundled and not Path(name).exists():
        return bundled[name]
    return Path(name)


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
        f"{DEMO_CONFIG}\nBundled configs, selectable by name: {', '.join(bundled_configs())}.\n"
        "Every key below overrides the config file, e.g. --algo.name rkl --run.steps 100.",
    )  # fmt: skip
    train.add_argument("--config", help="YAML config file, or a bundled config's name (default: demo)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    train.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    add_arguments(train, TrainConfig)
    report = commands.add_parser("report", help="(re)write report.md and plots of a run folder")
    report.add_argument("run_dir")
    merge = commands.add_parser("merge", help="fold a LoRA checkpoint into its base model (plain HF model folder)")
    merge.add_argument("checkpoint", help="a checkpoint folder or a run folder (its latest checkpoint)")
    merge.add_argument("output", help="folder to write the merged model to")
    merge.add_argument("--base", help="base model (default: the one recorded in adapter_config.json)")
    add_serve_teacher(commands)
    importlib.import_module("reopold.benchmark.command").add_command(commands)
    importlib.import_module("reopold.evaluation.commands").add_commands(commands)
    keys = commands.add_parser("keys", help="list every config key with its type, default and help")
    keys.set_defaults(command="keys")
    return parser


def add_serve_teacher(commands) -> None:
    parser = commands.add_parser(
        "serve-teacher", help="host a teacher for teacher.url (the completions subset vLLM speaks)",
        description="Serve a Hugging Face causal LM as a remote teacher: POST /v1/completions with prompt_logprobs, "
        "POST /tokenize, GET /v1/models, GET /health. Point training at it with --teacher.url http://HOST:PORT.",
    )  # fmt: skip
    parser.add_argument("model", metavar="MODEL", help="Hugging Face model name or local directory (or demo-teacher)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                        "only; 0.0.0.0 for every interface: there is no authentication, so private networks only)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="weights dtype (bfloat16 on GPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--served-model-name", default=None, help="the name clients send as 'model' (default: MODEL)")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="sequences per forward pass (default 16)")


def run_train(args, rest: list[str]) -> int:
    overrides = [*args.overrides, *rest]
    if args.resume:
        from reopold.train.preflight import resume_config

        config = resume_config(Path(args.resume), overrides)
    else:
        config = load_config(TrainConfig, config_path(args.config), overrides)
    if args.show_config:
        import yaml

        from reopold.config.loader import to_dict

        print(yaml.safe_dump(to_dict(config), sort_keys=False))
        return 0
    from reopold.train.run import train

    run_dir = train(config, resume=args.resume)
    print(f"done: {run_dir} (report: {run_dir / 'report.md'})")
    return 0


def run_report(args, rest: list[str]) -> int:
    from reopold.evaluation.report import write_report

    print(write_report(args.run_dir))
    return 0


def run_merge(args, rest: list[str]) -> int:
    from reopold.models.loading import merge_adapter
    from reopold.train.checkpoint import latest_checkpoint

    checkpoint = Path(args.checkpoint)
    if (checkpoint / "checkpoints").is_dir():
        checkpoint = latest_checkpoint(checkpoint) or checkpoint
    print(merge_adapter(checkpoint, args.output, base=args.base))
    return 0


def run_serve_teacher(args, rest: list[str]) -> int:
    from reopold.teacher.server import serve_teacher

    serve_teacher(args.model, args.host, args.port, dtype=args.dtype, device=args.device,
                  served_model_name=args.served_model_name, micro_batch_size=args.micro_batch_size)
    return 0


def run_module(module: str):
    return lambda args, rest: importlib.import_module(module).run_command(args)


HANDLERS = {
    "train": run_train, "report": run_report, "merge": run_merge, "serve-teacher": run_serve_teacher,
    "benchmark": run_module("reopold.benchmark.command"), "eval": run_module("reopold.evaluation.commands"),
    "scaling": run_module("reopold.evaluation.commands"),
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "keys":
        print(config_help(TrainConfig))
        return 0
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return HANDLERS[args.command](args, rest)
    except ModuleNotFoundError as err:
        if err.name in TRAIN_STACK:
            print(f"reopold: error: `reopold {args.command}` needs {err.name}: pip install 'reopold[train]'",
                  file=sys.stderr)
            return 2
        print(f"reopold: error: {err}", file=sys.stderr)
        return 2
    except BAD_INPUT as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"reopold: error: {message}", file=sys.stderr)
        return 2
    except (TrainingStopped, TeacherUnavailable) as err:
        print(f"reopold: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("reopold: interrupted", file=sys.stderr)
        return 130
