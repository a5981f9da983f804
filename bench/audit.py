"""Counts the operator's API writes per TrainingJob from the API server's audit log (bench/cluster.py).

The audit policy logs, at Metadata level, every write (create, update, patch, delete) made by one user: the
operator's ServiceAccount. A write belongs to a TrainingJob when it names the TrainingJob itself (its
annotations, its status) or one of its children, whose names all start with the TrainingJob's name followed
by "-". "Before its Job exists" means received before the create of the Job was received. Events have
generated names, so they are counted for the namespace as a whole.
"""

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

WRITE_VERBS = ["create", "update", "patch", "delete"]


def policy(user: str) -> dict[str, Any]:
    """Log the writes of `user` and nothing else."""
    return {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata", "users": [user], "verbs": WRITE_VERBS}, {"level": "None"}],
    }


def _events(log: Path) -> Iterable[dict[str, Any]]:
    for line in log.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def _what(event: Mapping[str, Any]) -> str:
    ref = event.get("objectRef") or {}
    resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return f"{event['verb']} {resource}"


def writes_per_trainingjob(log: Path, namespace: str, names: list[str], job_suffix: str) -> dict[str, str]:
    """Rows for the bench table: the mean writes per TrainingJob before its Job exists and in all, each with
    its breakdown by verb and resource."""
    mine: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    [width] = {len(name) for name in names}  # the bench's names are fixed-width, so none prefixes another
    unnamed: Counter[str] = Counter()  # kopf's Events have generated names: counted, not attributed
    for event in _events(log):
        ref = event.get("objectRef") or {}
        obj = ref.get("name") or ""
        owner = obj[:width]
        if ref.get("namespace") != namespace:
            continue
        if owner in mine and obj[width : width + 1] in ("", "-", "."):
            mine[owner].append(event)
        elif not obj:
            unnamed[_what(event)] += 1
    before: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for name, events in mine.items():
        events.sort(key=lambda e: e["requestReceivedTimestamp"])
        job = f"{name}{job_suffix}"
        seen_job = False
        for event in events:
            what = _what(event)
            total[what] += 1
            if what == "create jobs" and (event.get("objectRef") or {}).get("name") == job:
                seen_job = True
            if not seen_job:
                before[what] += 1
    count = len(names)

    def row(counter: Counter[str]) -> str:
        parts = ", ".join(f"{what} {n / count:.2g}" for what, n in counter.most_common())
        return f"{sum(counter.values()) / count:.2f} ({parts or 'none'})"

    return {
        "operator API writes per TrainingJob before its Job exists": row(before),
        "operator API writes per TrainingJob in all (until the first status)": row(total),
        "operator writes with generated names (Events), per TrainingJob": row(unnamed),
    }
