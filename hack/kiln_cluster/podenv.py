"""How the node agent turns a container spec into a local command line and environment.

Processes are not containerised, so what a container would see through its mounts and network namespace is
translated instead. In every argument and environment value (after Kubernetes' `$(VAR)` expansion):

- a volumeMount's mountPath used as a path prefix (`/artifacts`, `/artifacts/ns/job`, `--config=/etc/kiln/x`)
  becomes the local folder that volume maps to; paths a program builds itself from constants are NOT
  rewritten, so kiln's pods must receive every path through their args or env;
- the wildcard host `0.0.0.0` becomes the pod's own loopback address (127.x.y.z), so two pods can serve on
  the same port;
- a pod DNS name `<hostname>.<subdomain>.<namespace>.svc[.cluster.local]` (DDP's MASTER_ADDR) becomes that
  pod's address, which the agent reserves ahead of the pod starting.

`kiln` resolves to the test interpreter's `kiln` script (or `python -m kiln.cli`), `python`/`python3` to the
test interpreter itself.
"""

import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
# (namespace, hostname, subdomain) -> IP; the agent's reservation table.
Resolver = Callable[[str, str, str], str]

# What the node agent's Node offers; resourceFieldRefs without a request or limit read it.
NODE_CAPACITY = {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "200Gi", "nvidia.com/gpu": "4"}
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")
_WILDCARD = re.compile(r"(?<![\d.])0\.0\.0\.0(?![\d.])")
_POD_DNS = re.compile(r"\b([a-z0-9]([a-z0-9-]*[a-z0-9])?)\.([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?\b")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, `$$` escapes, unknown ones stay as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(one, text)


def rewrite(text: str, mounts: list[tuple[str, Path]], pod_ip: str, namespace: str, resolve: Resolver) -> str:
    """Apply the three translations described in the module docstring to one argument or value."""
    if mounts:
        # One pass over all mount paths, longest first, so a replacement (a local path under /tmp) is never
        # rewritten again by a shorter mount (an emptyDir at /tmp).
        local = {m.rstrip("/"): str(p) for m, p in mounts}
        choices = "|".join(re.escape(m) for m in sorted(local, key=len, reverse=True))
        pattern = re.compile(r"(?<![\w.\-/])(" + choices + r")(?=/|$|[^\w.\-])")
        text = pattern.sub(lambda m: local[m.group(1)], text)
    text = _WILDCARD.sub(pod_ip, text)
    return _POD_DNS.sub(lambda m: resolve(m.group(4), m.group(1), m.group(3)), text)


def field_value(pod: Obj, path: str, pod_ip: str, host_ip: str) -> str:
    """A downward-API fieldRef's value (metadata.name, metadata.annotations['k'], status.podIP, ...)."""
    meta, spec = pod["metadata"], pod["spec"]
    keyed = _FIELD_KEY.match(path)
    if keyed:
        return str((meta.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path not in values:
        raise ValueError(f"unsupported fieldRef {path!r}")
    return str(values[path])


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text: str) -> float:
    """A Kubernetes quantity ('500m', '2', '4Gi') as a number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text).strip())
    if not match or match.group(2) not in ("", *_SUFFIXES):
        raise ValueError(f"unsupported quantity {text!r}")
    return float(match.group(1)) * _SUFFIXES.get(match.group(2), 1.0)


def resource_value(container: Obj, ref: Obj, node_allocatable: Mapping[str, str]) -> str:
    """A resourceFieldRef's value: the container's limit (else request, else the node's), over the divisor."""
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource) or (resources.get("requests") or {}).get(resource)
    value = quantity(raw or node_allocatable.get(resource, "0"))
    divisor = quantity(ref.get("divisor") or "1")
    result = value / divisor
    return str(int(result) if result == int(result) else int(result) + 1)  # the kubelet rounds up


def resolve_command(argv: list[str]) -> list[str]:
    """Map the image's entry points onto this machine: kiln and python run from the test interpreter."""
    if not argv:
        raise ValueError("the node agent needs an explicit command (it has no image entrypoint)")
    head, rest = argv[0], argv[1:]
    interpreter = Path(sys.executable)
    if head == "kiln":
        script = interpreter.parent / "kiln"
        return [str(script), *rest] if script.exists() else [str(interpreter), "-m", "kiln.cli", *rest]
    if head in ("python", "python3", "/usr/bin/python", "/usr/bin/python3", "/usr/local/bin/python"):
        return [str(interpreter), *rest]
    found = shutil.which(head)
    return [found or head, *rest]
