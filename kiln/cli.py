"""The `kiln` command: one table of subcommands, each loaded only when chosen, so `kiln --help` and
`kiln --version` are instant and need neither torch nor onnxruntime nor kopf.

This module and ``kiln.local`` (`kiln run`) are the core's top floor: the only core modules that import a
component, always inside a function and always a command module the component exposes (its
``add_arguments(parser)`` and ``run(args) -> int``, or a typed entry point such as
``kiln_trainer.train_command.train_file``). ``kiln.api`` and the rest of the core import no component at
all (tests/unit/test_imports.py).
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import kiln


def _crd() -> ModuleType:
    from kiln import crd_command

    return crd_command


def _train() -> ModuleType:
    from kiln_trainer import train_command

    return train_command


def _compile() -> ModuleType:
    from kiln_trainer import compile_command

    return compile_command


def _serve() -> ModuleType:
    from kiln_serving import serve_cli

    return serve_cli


def _operator() -> ModuleType:
    from kiln_operator import operator_command

    return operator_command


def _run() -> ModuleType:
    from kiln import local

    return local


@dataclass(frozen=True)
class Subcommand:
    help: str
    load: Callable[[], ModuleType]  # the module with add_arguments(parser) and run(args) -> int
    extra: str  # the `kiln[...]` extra that installs what it needs


SUBCOMMANDS: dict[str, Subcommand] = {
    "crd": Subcommand("print the TrainingJob CRD generated from kiln.api", _crd, "all"),
    "train": Subcommand("train (and compile) a model from a TrainingJob file", _train, "trainer"),
    "compile": Subcommand("compile a checkpoint to ONNX variants and write the model card", _compile, "trainer"),
    "serve": Subcommand("serve a compiled model over the Open Inference Protocol", _serve, "serving"),
    "operator": Subcommand("run the Kubernetes operator", _operator, "operator"),
    "run": Subcommand("train, compile and optionally serve a TrainingJob on this machine", _run, "trainer,serving"),
}


def _load(name: str) -> ModuleType:
    try:
        return SUBCOMMANDS[name].load()
    except ImportError as err:
        sys.stderr.write(f"kiln {name}: missing dependency ({err.name}); install kiln[{SUBCOMMANDS[name].extra}]\n")
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kiln", description="Train, compile and serve image classifiers.")
    parser.add_argument("--version", action="version", version=f"kiln {kiln.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    # Only the chosen subcommand's module is imported, and only to build its own parser.
    if argv and argv[0] in SUBCOMMANDS:
        name = argv[0]
        module = _load(name)
        sub_parser = argparse.ArgumentParser(prog=f"kiln {name}", description=SUBCOMMANDS[name].help)
        module.add_arguments(sub_parser)
        code: int = module.run(sub_parser.parse_args(argv[1:]))
        return code
    parser.parse_args(argv)
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":
    raise SystemExit(main())
