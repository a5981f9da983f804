"""The binaries hack/install-test-tools.sh builds, for the unit tests that run one: from $KILN_TEST_BIN (set by
`make test`), else PATH; a test needing one that is found in neither is skipped, saying how to get it."""

import os
import shutil
from pathlib import Path

import pytest


def find_tool(name: str) -> str | None:
    test_bin = os.environ.get("KILN_TEST_BIN")
    if test_bin and (Path(test_bin) / name).is_file():
        return str(Path(test_bin) / name)
    return shutil.which(name)


def needs(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        find_tool(name) is None, reason=f"{name} not found: run `make test` (sets KILN_TEST_BIN) or put {name} on PATH"
    )
