"""`kiln crd`: print the generated CustomResourceDefinition."""

import argparse
import sys

from kiln.api import crd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", help="write to this file instead of standard output")


def run(args: argparse.Namespace) -> int:
    text = crd.trainingjob_crd_yaml()
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
