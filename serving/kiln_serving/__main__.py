"""`python -m kiln_serving`: the same flags as `kiln serve`."""

import argparse

from kiln_serving import serve_cli


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiln_serving", description="Serve a compiled model over the Open Inference Protocol."
    )
    serve_cli.add_arguments(parser)
    return serve_cli.run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
