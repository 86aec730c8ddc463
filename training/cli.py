"""The `mmserve` command: train, evaluate, demo-data, and dispatch to export / validate / serve.

Heavy imports (torch) happen inside the subcommands that need them: the serving image has no
torch and runs `mmserve serve`. User errors (bad data, bad config, missing files) print one
line `mmserve: error: ...` to stderr and exit with code 2, never a stack trace.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

EXIT_USER_ERROR = 2

# subcommands owned by other modules: name -> (module, help); each module has main(argv) -> int | None
DISPATCH = {
    "export": ("training.export", "export a run to ONNX + TorchScript in a model repository"),
    "validate": ("training.validate", "check an exported model version (manifest, files, parity)"),
    "serve": ("app.__main__", "run the HTTP inference server"),
    "demo-model": ("training.demo_model", "build the demo models (once) into a model repository"),
    "bench": ("bench.__main__", "benchmark serving against the model's limit and a peer server"),
}

def train_flags(parser: argparse.ArgumentParser) -> list[str]:
    """One flag per TrainConfig field, generated from its type, choices and description; returns the
    field names. Every default is None ("not given"), so a --config file's value is kept unless a
    flag overrides it; the real defaults live in TrainConfig alone and are shown in the help."""
    import types
    import typing

    from training.config import TrainConfig

    names = []
    for name, info in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = info.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = args[0]  # X | None: the flag takes an X
        default = None if info.is_required() else (info.default_factory() if info.default_factory else info.default)
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = (info.description or "") + ("" if info.is_required() or default is None else f" (default: {shown})")
        kwargs: dict = {"default": None, "help": help_text, "dest": name}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif typing.get_origin(annotation) is list:
            kwargs["metavar"] = ",".join(typing.get_args(typing.get_args(annotation)[0]))
        else:
            kwargs["type"] = annotation
            kwargs["metavar"] = name.split("_")[-1].upper() if annotation is str else annotation.__name__.upper()
        parser.add_argument(flag, **kwargs)
        names.append(name)
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser("train", help="fine-tune a fused model", description="Fine-tune a fused model. "
                           "Settings: defaults < --config YAML < flags.")
    train.add_argument("--config", type=Path, metavar="YAML", help="run config file (keys = flag names)")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                       help="continue from RUN_DIR/checkpoint (RUN_DIR defaults to --output); "
                            "settings come from RUN_DIR/config.yaml, flags override")
    train_flags(train)

    ev = sub.add_parser("evaluate", help="metrics of a trained run on a data split")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--data", type=Path, required=True, metavar="DIR")
    ev.add_argument("--split", default="test")
    ev.add_argument("--output", type=Path, default=None, help="JSON path (default RUN_DIR/eval_SPLIT.json)")
    ev.add_argument("--skip-bad", action="store_true")
    ev.add_argument("--batch-size", type=int, default=64)

    demo = sub.add_parser("demo-data", help="write the demo data set")
    demo.add_argument("out_dir", type=Path)
    demo.add_argument("--seed", type=int, default=0)

    for name, (_, help_text) in DISPATCH.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from training.config import resolve_config

    from training.config import TrainConfig

    overrides = {name: getattr(args, name) for name in TrainConfig.model_fields}
    resume = args.resume is not None
    file = args.config
    if resume:
        run_dir = Path(args.resume) if args.resume is not True else (Path(args.output) if args.output else None)
        if run_dir is None:
            raise_user("--resume needs a run directory (--resume RUN_DIR or --output RUN_DIR)")
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise_user(f"{run_dir}: nothing to resume ({saved.name} missing)")
        if file is not None:
            raise_user("--resume reads RUN_DIR/config.yaml; do not combine it with --config")
        file = saved
        overrides["output"] = str(run_dir)
    config = resolve_config(file, overrides)
    from training.train import train

    train(config, resume=resume)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, format_metrics

    values = evaluate(args.run_dir, args.data, args.split, output=args.output, skip_bad=args.skip_bad,
                      batch_size=args.batch_size)
    print(f"{args.split}: {format_metrics(values)}")
    print(f"wrote {args.output or Path(args.run_dir) / f'eval_{args.split}.json'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from training.demo_data import write_demo_data

    write_demo_data(args.out_dir, seed=args.seed)
    print(f"wrote {args.out_dir}/{{classify,ner,vqa}}/{{train,dev,test}}.jsonl")
    return 0


class _UserError(Exception):
    pass


def raise_user(message: str):
    raise _UserError(message)


def _dispatch(name: str, argv: list[str]) -> int:
    module_name = DISPATCH[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise _UserError(f"'mmserve {name}' is not available: module {module_name} is not installed") from None
        raise _UserError(f"'mmserve {name}' needs the missing package {exc.name!r}: {exc}") from None
    if not hasattr(module, "main"):
        raise _UserError(f"'mmserve {name}' is not available: {module_name} has no main()")
    result = module.main(argv)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmserve` console script; returns the exit code (also when called directly)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # pass-through subcommands get their raw arguments (including --help)
    if argv and argv[0] in DISPATCH:
        return _run(lambda: _dispatch(argv[0], argv[1:]), exit_on_return=True)
    args = _parser().parse_args(argv)
    handler = {"train": _cmd_train, "evaluate": _cmd_evaluate, "demo-data": _cmd_demo}[args.command]
    return _run(lambda: handler(args), exit_on_return=True)


def _run(fn, exit_on_return: bool) -> int:
    from training.config import ConfigError  # light: pydantic + yaml only

    try:
        return fn()
    except (_UserError, ConfigError) as exc:  # DataError is a ConfigError
        print(f"mmserve: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as exc:
        print(f"mmserve: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("mmserve: interrupted", file=sys.stderr)
        return 130


def console() -> None:  # pragma: no cover - thin wrapper
    sys.exit(main())


def entry() -> None:
    """The console script and `python -m training.cli`: run `main`, then exit with its code.

    A torchrun worker exits without the interpreter's teardown (see training/distributed.py)."""
    from training import distributed

    code = main()
    if distributed.launched():
        distributed.exit_worker(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
