"""What trainer and server pods say: non-zero exits, why they are not running yet, and retries so far.

Pure functions over Pod objects as the API server reports them; `status` builds verdicts from them.
"""

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Final

Body = Mapping[str, Any]

TAIL_LINES: Final = 5
TAIL_CHARS: Final = 1024
# Waiting reasons that are normal steps of a pod's start, not worth reporting.
ROUTINE_WAITING: Final = ("ContainerCreating", "PodInitializing")
COMPLETION_INDEX: Final = "batch.kubernetes.io/job-completion-index"


def _tail(text: str | None) -> str:
    """The last few lines of a termination message: where a traceback says what went wrong."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return "\n".join(lines[-TAIL_LINES:])[-TAIL_CHARS:]


@dataclasses.dataclass(frozen=True)
class Termination:
    """A container that exited non-zero."""

    pod: str
    container: str
    exit_code: int
    reason: str
    message: str
    finished_at: str

    def describe(self) -> str:
        text = f"pod {self.pod} container {self.container} exited with code {self.exit_code} ({self.reason})"
        return f"{text}: {_tail(self.message)}" if self.message.strip() else text


def terminations(pods: Iterable[Body]) -> list[Termination]:
    """Non-zero exits of every container, current or previous, oldest first."""
    found = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        pod_ref = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                term = state.get("terminated")
                if term and term.get("exitCode", 0) != 0:
                    found.append(
                        Termination(
                            pod_ref,
                            cs.get("name", ""),
                            int(term["exitCode"]),
                            term.get("reason") or "Error",
                            term.get("message") or "",
                            term.get("finishedAt") or "",
                        )
                    )
    return sorted(found, key=lambda t: t.finished_at)


def waiting_message(pods: Iterable[Body], limit: int = 3) -> str:
    """Why pods are not running yet: unschedulable, image pull errors, crash loops."""
    notes = []
    for pod in pods:
        name, status = (pod.get("metadata") or {}).get("name", ""), pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                notes.append(f"pod {name}: {cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}".rstrip())
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason") not in ROUTINE_WAITING:
                note = f"pod {name}: container {cs.get('name')} {waiting.get('reason')}: {waiting.get('message', '')}"
                notes.append(note.rstrip(": "))
    return "; ".join(notes[:limit])


def count_restarts(pods: Iterable[Body], previous: int | None) -> int:
    """Retries so far: replacement pods (an index with n pods was retried n - 1 times) plus in-place container
    restarts. Pods the Job kills when it ends (failed or past its deadline) are not retries. Never decreases,
    so it survives the removal of old pods.
    """
    per_index: dict[str, int] = {}
    in_place = 0
    for pod in pods:
        meta = pod.get("metadata") or {}
        index = (meta.get("labels") or {}).get(COMPLETION_INDEX) or (meta.get("annotations") or {}).get(
            COMPLETION_INDEX, meta.get("name", "")
        )
        per_index[index] = per_index.get(index, 0) + 1
        in_place += sum(cs.get("restartCount") or 0 for cs in (pod.get("status") or {}).get("containerStatuses") or [])
    return max(previous or 0, in_place + sum(n - 1 for n in per_index.values()))
