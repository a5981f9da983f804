"""``python -m kiln_trainer``: the same as ``kiln train``, what trainer pods run."""

import argparse
import sys

from kiln_trainer import train_command


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln_trainer", description="Train a model from a TrainingJob.")
    train_command.add_arguments(parser)
    return train_command.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
