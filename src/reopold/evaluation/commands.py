"""``reopold eval`` (pass@k, avg@k, maj@k and every sample of one model) and ``reopold scaling`` (latency against
accuracy as K parallel samples grow, for several models). Every input is checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMMANDS = ("eval", "scaling")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,8; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task", default="arithmetic", help="bundled task (default: arithmetic)")
    source.add_argument("--problems", metavar="FILE", help="JSONL (or saved dataset) of problems with answers")
    parser.add_argument("--prompt-key", default="prompt", help="field of a problem's prompt in --problems")
    parser.add_argument("--answer-key", default="answer", help="field of a problem's reference answer in --problems")
    parser.add_argument("--image-key", help="image prompts: field of a problem's image(s) in --problems (file paths "
                        "relative to the file, or a datasets Image column); needs a vision-language model")
    parser.add_argument("--digits", type=_int_list, default=[3, 2], help="digits of the arithmetic factors (3,2)")
    parser.add_argument("--split", default="test", choices=("validation", "test"), help="split of the bundled task")
    parser.add_argument("--num-problems", type=int,
                        help="first N problems (default: eval 200 of a task or all of a file; scaling 32)")
    parser.add_argument("--checker", default="exact", choices=("exact", "math"),
                        help="exact: the task's own match; math: math-verify equivalence (pip install 'reopold[math]')")
    parser.add_argument("--max-new-tokens", type=int,
                        help="response budget (default: the longest gold arithmetic answer + EOS; 1024 for a file)")
    parser.add_argument("--chat-template", default="auto", choices=("auto", "on", "off"),
                        help="wrap prompts in the tokenizer's chat template: auto = when it has one")
    parser.add_argument("--max-turns", type=int, default=3,
                        help="a task with an environment (tool use): assistant turns per episode, each of at most "
                             "--max-new-tokens (docs/tools.md)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bfloat16 on GPU, float32 on CPU")


def add_commands(subparsers) -> None:
    """Add ``eval`` and ``scaling`` to the ``reopold`` sub-command parsers."""
    evaluate = subparsers.add_parser(
        "eval", help="pass@k, avg@k, maj@k and answer length of a model or a run's latest checkpoint",
        description="Sample n answers per problem and report pass@1, and pass@k, avg@k, maj@k for each k. Writes "
        "metrics.json and samples.jsonl (one record per sample) to --out.",
    )  # fmt: skip
    evaluate.add_argument("model", help="demo-student, demo-teacher, a model path or hub name, or a run folder")
    evaluate.add_argument("--n", type=int, default=8, help="samples per problem (n >= every k)")
    evaluate.add_argument("--k", type=_int_list, help="k values, e.g. 1,4,8 (default: 1, 2, 4, ... up to n)")
    evaluate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (n=1)")
    evaluate.add_argument("--batch-size", type=int, default=256, help="sequences per generate call")
    evaluate.add_argument("--out", help="output folder (default: <run>/eval-<checkpoint> or eval-<model name>)")
    _add_problem_arguments(evaluate)
    scaling = subparsers.add_parser(
        "scaling", help="test-time scaling: latency against pass@K / maj@K of K parallel samples, per model",
        description="For each K, time K answers generated in parallel per problem for every model, on this machine in "
        "this run, and write scaling.md (table, latency ratios at matched accuracy), scaling.json and scaling.png.",
    )  # fmt: skip
    scaling.add_argument("--model", action="append", required=True, metavar="[LABEL=]MODEL",
                         help="a model to measure (repeat); LABEL names it in the table and plot")
    scaling.add_argument("--reference", help="label the latency ratios are taken against (default: the first model)")
    scaling.add_argument("--ks", type=_int_list, default=[1, 2, 4, 8], help="K values, increasing (1,2,4,8)")
    scaling.add_argument("--metric", default="maj", choices=("maj", "pass"), help="accuracy matched in the ratios")
    scaling.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    scaling.add_argument("--out", default="scaling", help="output folder (default: ./scaling)")
    _add_problem_arguments(scaling)


def resolve_model_path(name: str) -> str:
    """A loadable model path or hub name: the latest checkpoint of a run folder, a demo alias, a local folder."""
    from reopold.models.loading import resolve_model
    from reopold.train.checkpoint import checkpoint_root, latest_checkpoint

    folder = Path(name).expanduser()
    if checkpoint_root(folder).is_dir() and not (folder / "config.json").exists():
        checkpoint = latest_checkpoint(folder)
        if checkpoint is None:
            raise FileNotFoundError(f"run folder {name!r} has no complete checkpoint yet")
        return str(checkpoint)
    return resolve_model(name)


def load_problems(args, default_count: int | None) -> tuple[list, object]:
    """(problems, task) named by --task or --problems, the first --num-problems of them (else ``default_count``;
    None: all of a file). Every problem of a file must have a reference answer."""
    from reopold.tasks import Problem, get_task

    if args.problems is None:
        task = get_task(args.task, **({"digits": tuple(args.digits)} if args.task == "arithmetic" else {}))
        return task.problems(args.split, args.num_problems or default_count or 200), task
    from reopold.tasks.prompts import PromptTask, load_records

    if getattr(args, "image_key", None):  # image prompts: every row of the file, with its images
        from reopold.tasks.visual import ImagePromptTask

        task = ImagePromptTask(args.problems, prompt_key=args.prompt_key, answer_key=args.answer_key,
                               image_key=args.image_key, held_out=0)
        problems = task.problems("train", len(task.problems("train", 10**9)))
        if any(p.answer is None for p in problems):
            raise ValueError(f"{args.problems}: every row needs a reference answer under {args.answer_key!r}")
        return problems[: args.num_problems or default_count or len(problems)], task
    records = load_records(args.problems, prompt_key=args.prompt_key)
    for row, record in enumerate(records, start=1):
        answer = record.get(args.answer_key)
        if answer is None or not str(answer).strip():
            raise ValueError(f"{args.problems}: row {row} has no reference answer under {args.answer_key!r} "
                             "(set --answer-key); every problem needs one to be graded")
    problems = [Problem(r[args.prompt_key], str(r[args.answer_key])) for r in records]
    task = PromptTask(args.problems, prompt_key=args.prompt_key, answer_key=args.answer_key)
    return problems[: args.num_problems or default_count or len(problems)], task


def _checked_common(args, default_count: int | None) -> tuple[list, object, object, int]:
    """(problems, task, checker, max_new_tokens) after validating everything that needs no model."""
    from reopold.tasks.checkers import build_checker

    if args.num_problems is not None and args.num_problems < 1:
        raise ValueError(f"--num-problems must be at least 1, got {args.num_problems}")
    problems, task = load_problems(args, default_count)
    checker = build_checker(args.checker, task)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = task.max_completion_chars() + 1 if hasattr(task, "max_completion_chars") else 1024
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    return problems, task, checker, max_new_tokens


def _device_and_dtype(args) -> tuple[str, str]:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, dtype


def _load(path: str, args, device: str, dtype: str):
    from reopold.models.loading import is_vision_model, load_model, load_processor, load_tokenizer
    from reopold.tasks.prompts import PromptEncoder

    tokenizer = load_tokenizer(path)
    if is_vision_model(path):  # image prompts rendered with the model's processor (docs/vision.md)
        from reopold.tasks.visual import VisionPromptEncoder

        encode = VisionPromptEncoder(load_processor(path))
        tokenizer = encode.tokenizer
    else:
        encode = PromptEncoder(tokenizer, args.chat_template)
    return load_model(path, dtype=dtype, device=device, trainable=False), tokenizer, encode


def _episodes(task, tokenizer, encode, args):
    """The EpisodeSetup of a task with an environment (its answers are episodes), else None."""
    from reopold.rollout.episodes import build_episodes

    if args.max_turns < 1:
        raise ValueError(f"--max-turns must be at least 1, got {args.max_turns}")
    return build_episodes(task, tokenizer, chat_template=bool(getattr(encode, "use_template", False)),
                          max_turns=args.max_turns, processor=getattr(encode, "processor", None))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def run_eval(args) -> Path:
    import torch

    from reopold.evaluation.heldout import sample_and_grade
    from reopold.evaluation.metrics import check_k, summarize

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    ks = sorted(set(args.k or default_ks(args.n)))
    for k in ks:
        check_k(args.n, k)
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.temperature == 0 and args.n > 1:
        raise ValueError("--temperature 0 is greedy decoding, which gives n identical samples; use --n 1 or a "
                         "temperature above 0")
    path = resolve_model_path(args.model)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    problems, task, checker, max_new_tokens = _checked_common(args, None)
    out = Path(args.out) if args.out else _default_out(args.model, path)
    device, dtype = _device_and_dtype(args)
    model, tokenizer, encode = _load(path, args, device, dtype)

    torch.manual_seed(args.seed)
    graded = sample_and_grade(model, tokenizer, problems, encode, checker, num_samples=args.n,
                              max_new_tokens=max_new_tokens, temperature=args.temperature or 1.0,
                              greedy=args.temperature == 0, batch_size=args.batch_size,
                              episodes=_episodes(task, tokenizer, encode, args))
    correct = [[g.correct for g in graded[i * args.n : (i + 1) * args.n]] for i in range(len(problems))]
    answers = [[g.answer for g in graded[i * args.n : (i + 1) * args.n]] for i in range(len(problems))]
    metrics = summarize(correct, answers, ks)
    metrics["response_length"] = sum(g.length for g in graded) / len(graded)
    metrics["no_answer_rate"] = sum(g.answer is None for g in graded) / len(graded)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as handle:
        for g in graded:
            problem = problems[g.problem]
            handle.write(json.dumps({"problem": g.problem, "sample": g.sample, "prompt": problem.prompt,
                                     "reference": problem.answer, "completion": g.completion, "answer": g.answer,
                                     "correct": g.correct, "length": g.length}) + "\n")
    settings = {"model": args.model, "path": path, "task": args.problems or args.task, "checker": args.checker,
                "num_problems": len(problems), "n": args.n, "ks": ks, "temperature": args.temperature,
                "max_new_tokens": max_new_tokens, "seed": args.seed, "device": device, "dtype": dtype}
    (out / "metrics.json").write_text(json.dumps({**settings, "metrics": metrics}, indent=2) + "\n")
    print(f"{args.model} on {len(problems)} problems x {args.n} samples ({args.checker} checker):")
    for key, value in metrics.items():
        print(f"  {key:>16} {value:.4f}")
    return out


def _default_out(name: str, path: str) -> Path:
    checkpoint = Path(path)
    if checkpoint.parent.name == "checkpoints" and checkpoint.parent.parent == Path(name).expanduser():
        return checkpoint.parent.parent / f"eval-{checkpoint.name}"
    return Path(f"eval-{Path(name.rstrip('/')).name}")


def _model_specs(specs: list[str]) -> list[tuple[str, str]]:
    """[(label, path)] of --model LABEL=MODEL or MODEL (label: the model's folder or alias name)."""
    parsed = []
    for spec in specs:
        label, _, name = spec.partition("=") if "=" in spec else ("", "", spec)
        parsed.append((label or Path(name.rstrip("/")).name, resolve_model_path(name)))
    labels = [label for label, _ in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"models need distinct labels, got {labels}; name them with --model LABEL=MODEL")
    return parsed


def run_scaling(args) -> Path:
    from reopold.evaluation.scaling import ScalingModel, measure_scaling, plot_scaling, results_to_json, scaling_table

    if args.ks != sorted(set(args.ks)) or args.ks[0] < 1:
        raise ValueError(f"--ks must be increasing positive integers, got {args.ks}")
    if args.temperature <= 0:
        raise ValueError("--temperature must be above 0: test-time scaling draws K different answers")
    specs = _model_specs(args.model)
    reference = args.reference or specs[0][0]
    if reference not in [label for label, _ in specs]:
        raise ValueError(f"--reference {reference!r} is not one of the model labels {[label for label, _ in specs]}")
    # Every problem is answered once per K per model, one at a time: a small default keeps a run short.
    problems, task, checker, max_new_tokens = _checked_common(args, 32)
    device, dtype = _device_and_dtype(args)
    loaded = [(label, *_load(path, args, device, dtype)) for label, path in specs]
    models = [ScalingModel(label, model, tokenizer, encode, _episodes(task, tokenizer, encode, args))
              for label, model, tokenizer, encode in loaded]

    results = measure_scaling(models, problems, checker, ks=args.ks, max_new_tokens=max_new_tokens,
                              temperature=args.temperature, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = _device_name(device)
    (out / "scaling.md").write_text(scaling_table(results, reference=reference, metric=args.metric, device=where))
    settings = {"models": dict(specs), "reference": reference, "task": args.problems or args.task,
                "checker": args.checker, "num_problems": len(problems), "ks": args.ks, "temperature": args.temperature,
                "max_new_tokens": max_new_tokens, "seed": args.seed, "device": where, "dtype": dtype}
    (out / "scaling.json").write_text(json.dumps({**settings, "points": results_to_json(results)}, indent=2) + "\n")
    plot_scaling(results, out / "scaling.png", title=f"{len(problems)} problems, {where}")
    print((out / "scaling.md").read_text())
    return out


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_command(args) -> int:
    """Run ``reopold eval`` or ``reopold scaling``; bad input raises (cli.main: one line, exit code 2)."""
    out = run_eval(args) if args.command == "eval" else run_scaling(args)
    print(f"done: {out}")
    return 0
