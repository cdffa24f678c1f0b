"""The ``reopold`` command. Sub-commands are parsed here and their modules imported only when they run, so
``reopold --help`` and config errors never load torch; every sub-command's errors leave through ``main``'s one
mapping to a one-line message and an exit code (2: bad input, 1: stopped, 130: interrupted)."""

from __future__ import annotations

import argparse
import importlib
import os
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
                        "only; 0.0.0.0 for every interface: set an API key, and private networks only: no TLS)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="weights dtype (bfloat16 on GPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--served-model-name", default=None, help="the name clients send as 'model' (default: MODEL)")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but "
                        "/health (default: $REOPOLD_API_KEY; unset: no authentication). The variable keeps the key "
                        "out of the process list; training sends it from the variable teacher.api_key_env names")
    parser.add_argument("--max-prompts", type=int, default=256, help="prompts per request; more get HTTP 413 "
                        "(default 256)")
    parser.add_argument("--max-tokens", type=int, default=2**18, help="tokens per request, all prompts together; more "
                        "get HTTP 413 (default 262144)")
    parser.add_argument("--read-timeout", type=float, default=30.0, help="seconds a connection may take to send its "
                        "request (default 30)")
    parser.add_argument("--workers", type=int, default=8, help="threads serving connections; 4x as many more may "
                        "wait, further ones get HTTP 503 (default 8)")


def run_train(args, rest: list[str]) -> int:
    overrides = [*args.overrides, *rest]
    if args.resume:
        from reopold.train.preflight import resume_config

        config = resume_config(Path(args.resume), overrides)
    else:
        config = load_config(TrainConfig, config_path(args.config), file_switches_yield(overrides))
    if args.show_config:
        import yaml

        from reopold.config.loader import to_dict

        print(yaml.safe_dump(to_dict(config), sort_keys=False))
        return 0
    quiet_deepspeed()
    from reopold.train.run import train

    try:
        run_dir = train(config, resume=args.resume)
    except KeyboardInterrupt:
        run_dir = Path(args.resume or Path(config.run.output_dir) / config.run_name)
        raise KeyboardInterrupt(interrupted_message(run_dir)) from None
    print(f"done: {run_dir} (report: {run_dir / 'report.md'})")
    return 0


def file_switches_yield(overrides: list[str]) -> list[str]:
    """Ablation switches set by the config file yield to an algorithm chosen on the command line that has none:
    the demo config's ``algo.two_phase: false`` must not block ``--algo.name sft``. Switches given on the command
    line still count (and still fail for such an algorithm)."""
    from reopold.config.loader import parse_overrides
    from reopold.config.schema import ALGORITHM_SWITCHES

    given = dict(parse_overrides(overrides))
    name = given.get("algo.name")
    if name is None or name.strip().strip("'\"") in ALGORITHM_SWITCHES:
        return overrides
    return [*(f"algo.{k}=null" for k in ALGORITHM_SWITCHES["reopold"] if f"algo.{k}" not in given), *overrides]


def interrupted_message(run_dir: Path) -> str:
    """What Ctrl-C during training leaves: the last checkpoint and the command that resumes from it."""
    from reopold.train.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None and run_dir.is_dir():
        return f"no checkpoint was written yet in {run_dir}; start over with the same command and --run.overwrite true"
    if checkpoint is None:
        return "nothing was written yet; run the same command again"
    return f"the last checkpoint is {checkpoint}; resume with: reopold train --resume {run_dir}"


def quiet_deepspeed() -> None:
    """Outside a DeepSpeed launch, transformers' save_pretrained still imports DeepSpeed when it is installed (for
    an isinstance check in accelerate), and on a machine without CUDA DeepSpeed then prints 'Setting accelerator to
    CPU' mid-progress-bar. Naming the CPU accelerator up front is what it would pick anyway, without the warning."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1") or "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def run_report(args, rest: list[str]) -> int:
    from reopold.evaluation.report import METRICS_FILE, write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}; pass the folder `reopold train` wrote (runs/<name>)")
    if not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} has no {METRICS_FILE}; it is not a run folder (runs/<name>)")
    print(write_report(run_dir))
    return 0


def run_merge(args, rest: list[str]) -> int:
    quiet_deepspeed()
    from reopold.models.loading import merge_adapter
    from reopold.train.checkpoint import latest_checkpoint

    checkpoint = Path(args.checkpoint)
    if (checkpoint / "checkpoints").is_dir():
        checkpoint = latest_checkpoint(checkpoint) or checkpoint
    print(merge_adapter(checkpoint, args.output, base=args.base))
    return 0


def run_serve_teacher(args, rest: list[str]) -> int:
    from reopold.teacher.server import serve_teacher

    quiet_deepspeed()
    serve_teacher(args.model, args.host, args.port, dtype=args.dtype, device=args.device,
                  served_model_name=args.served_model_name, micro_batch_size=args.micro_batch_size,
                  api_key=args.api_key, max_prompts=args.max_prompts, max_tokens=args.max_tokens,
                  read_timeout=args.read_timeout, workers=args.workers)
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
    except KeyboardInterrupt as err:
        print(f"reopold: interrupted: {err}" if str(err) else "reopold: interrupted", file=sys.stderr)
        return 130
