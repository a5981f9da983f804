"""The `kiln` command. Subcommands import their component lazily, so `kiln --help` is instant and needs
neither torch nor onnxruntime nor kopf."""

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# name -> (module implementing it, one-line help). Each module has `add_arguments(parser)` and
# `run(args) -> int`; components own their flags.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "crd": ("kiln.crd_command", "print the TrainingJob CRD generated from kiln.api"),
    "train": ("kiln_trainer.cli", "train (and compile) a model from a TrainingJob file"),
    "compile": ("kiln_trainer.compile_cli", "compile a checkpoint to ONNX variants and write the model card"),
    "serve": ("kiln_serving.serve_cli", "serve a compiled model over the Open Inference Protocol"),
    "operator": ("kiln_operator.cli", "run the Kubernetes operator"),
    "run": ("kiln.local", "train, compile and optionally serve a TrainingJob on this machine"),
}


def _load(module: str, name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[..., int]]:
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        extra = {
            "train": "trainer",
            "compile": "trainer",
            "serve": "serving",
            "operator": "operator",
            "run": "trainer,serving",
        }.get(name, "all")
        sys.stderr.write(f"kiln {name}: missing dependency ({err.name}); install kiln[{extra}]\n")
        raise SystemExit(1) from None
    return mod.add_arguments, mod.run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kiln", description="Train, compile and serve image classifiers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # Only the chosen subcommand's module is imported, and only to build its own parser.
    if argv and argv[0] in SUBCOMMANDS:
        name = argv[0]
        add_arguments, run = _load(SUBCOMMANDS[name][0], name)
        sub_parser = argparse.ArgumentParser(prog=f"kiln {name}", description=SUBCOMMANDS[name][1])
        add_arguments(sub_parser)
        return run(sub_parser.parse_args(argv[1:]))
    parser.parse_args(argv)
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":
    raise SystemExit(main())
