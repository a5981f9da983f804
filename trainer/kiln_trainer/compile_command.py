"""``kiln compile``: re-compile a checkpoint into ONNX variants and a model card without re-training.

Exit codes: 0 success; ``api.EXIT_CONFIG_ERROR`` (78) for a config that cannot be read, a corrupt checkpoint
or one that does not match the config; 1 when the model cannot be compiled (export refused, parity broken).
"""

import argparse
import logging
import sys
from pathlib import Path

from kiln import api
from kiln_trainer import errors

log = logging.getLogger(__name__)

# Libraries that narrate every graph pass at INFO; their warnings still show.
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "onnxruntime", "torch.onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, metavar="CKPT", help="the checkpoint to compile (default: DIR/checkpoints/best.pt)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the TrainingJob (or its spec) as YAML or JSON; it must match the checkpoint's training "
        "config, while its export and serving sections decide what is built (default: the config "
        "saved in the checkpoint)",
    )
    parser.add_argument(
        "--output", type=Path, required=True, metavar="DIR", help="where models/ and model-card.json are written"
    )
    parser.add_argument("--name", help="model name in the card (default: the TrainingJob's name)")
    parser.add_argument(
        "--repeats", type=int, default=10, metavar="N", help="timed runs per latency figure (default 10)"
    )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="onnxruntime intra-op threads while measuring (default: all cores)"
    )


def compile_checkpoint(
    output_dir: Path,
    *,
    checkpoint_path: Path | None = None,
    config: Path | None = None,
    name: str | None = None,
    repeats: int = 10,
    threads: int | None = None,
) -> api.ModelCard:
    """Rebuild the model from a checkpoint, re-read the data it was trained on, and compile it. Raises
    ConfigError when the checkpoint is unreadable or does not match the config, CompileError otherwise."""
    # Imported here so `kiln compile --help` stays instant.
    from kiln_trainer import checkpoint, data, handoff, models

    path = checkpoint_path or checkpoint.best_checkpoint_path(output_dir)
    saved = checkpoint.load_snapshot(path)
    if config is not None:
        job = api.load_trainingjob(config)
        spec, name = job.spec, name or job.metadata.name
        # The checkpoint is what is being compiled: the advice is about the config, never to delete it.
        remedy = "pass the TrainingJob it was trained with, or leave out --config to use the one saved in it"
        checkpoint.check_compatible(saved.config, spec, path, remedy=remedy)
    else:
        try:
            spec = api.TrainingJobSpec.model_validate(saved.config)
        except ValueError as err:
            raise errors.ConfigError(f"checkpoint {path} holds a config this version cannot read: {err}") from None
        name = name or output_dir.absolute().name

    bundle = data.load_data(spec)
    if saved.class_names is not None and saved.class_names != bundle.class_names:
        raise errors.ConfigError(
            f"checkpoint {path} was trained on classes {saved.class_names}, the data has {bundle.class_names}"
        )
    # The checkpoint holds every weight; pretrained weights named in the spec are not needed (or read) here.
    bare = spec.model_copy(update={"model": spec.model.model_copy(update={"weights": None})})
    model = models.build_model(bare, bundle.num_classes)
    try:
        model.load_state_dict(saved.weights)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])[:400]
        raise errors.ConfigError(
            f"checkpoint {path} does not fit {spec.model.architecture} with {bundle.num_classes} classes: {detail}"
        ) from None
    return handoff.compile_best(spec, bundle, model, saved, output_dir, name, repeats=repeats, threads=threads)


def run(args: argparse.Namespace) -> int:
    """Compile, print where the card is and what was selected; map failures to exit codes."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
    for chatty in _CHATTY_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        card = compile_checkpoint(
            args.output,
            checkpoint_path=args.checkpoint,
            config=args.config,
            name=args.name,
            repeats=args.repeats,
            threads=args.threads,
        )
    except api.ConfigError as err:  # also kiln_trainer.errors.ConfigError
        sys.stderr.write(f"kiln compile: error: {err}\n")
        return api.EXIT_CONFIG_ERROR
    except errors.CompileError as err:
        sys.stderr.write(f"kiln compile: error: {err}\n")
        return 1
    chosen = card.variant(card.selected)
    sys.stdout.write(f"{args.output}/model-card.json: serving {chosen.path} ({card.selection_reason})\n")
    return 0
