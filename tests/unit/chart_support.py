"""Shared by the Helm chart tests (test_chart_*.py): the real helm, a cached render, and lookups in what it renders.

helm comes from $KILN_TEST_BIN (set by `make test`), else PATH. The operator's own code is the reference
for what the chart must allow and configure: its CLI parses the rendered args, its config reader parses the
rendered ConfigMap, and its builders produce the children whose permissions the RBAC must grant.
"""

import functools
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from tool_support import find_tool, needs

from kiln import api
from kiln.api import constants

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kiln"
VALUES_FILES = [*sorted((CHART / "ci").glob("*-values.yaml")), ROOT / "deploy" / "kind" / "values.yaml"]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
NAMESPACE = "kiln-system"

Obj = dict[str, Any]


HELM = find_tool("helm")
needs_helm = needs("helm")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def render(*args: str) -> tuple[Obj, ...]:
    """`helm template kiln charts/kiln -n kiln-system ARGS`, parsed; fails the test on a helm error."""
    result = helm("template", "kiln", str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def values_args(path: Path) -> tuple[str, ...]:
    return ("--values", str(path))


def of_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def operator_container(objs: tuple[Obj, ...]) -> Obj:
    pod = one(objs, "Deployment", "kiln")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


def operator_children() -> Iterator[Obj]:
    """What the operator creates for each example TrainingJob, from its own builders."""
    from kiln_operator import config, objects, serving_objects, trainer_objects

    cfg = config.OperatorConfig()
    for path in EXAMPLES:
        job = api.load_trainingjob(path)
        owner = objects.Owner(name=job.metadata.name, namespace="ml-team-a", uid="0000")
        yield from trainer_objects.build_trainer_objects(owner, job.spec, cfg)
        yield serving_objects.build_deployment(owner, job.spec, cfg, None)
        yield serving_objects.build_service(owner)


def matches(selector: Obj, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(
        (labels.get(e["key"]) in e["values"]) == (e["operator"] == "In") for e in selector.get("matchExpressions", [])
    )


def pods_by_component() -> dict[str, Obj]:
    """A trainer and a serving pod template as the operator builds them."""
    pods = {}
    for child in operator_children():
        if child["kind"] in ("Job", "Deployment"):
            template = child["spec"]["template"]
            pods[template["metadata"]["labels"][constants.LABEL_COMPONENT]] = template
    return pods
