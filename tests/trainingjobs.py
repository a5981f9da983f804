"""Helpers for the TrainingJob scenarios of both tiers: manifests, waiting on phases, recording status, real digits.

Every scenario trains the built-in small CNN on scikit-learn's digits on CPU with few epochs, so the tiers fit
CI's budget on two cores. `describe` callbacks say what to print when a wait times out (pods, logs, events).
"""

import copy
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kiln import api
from kiln.api import constants
from kiln_cluster.rest import ApiError, Kube
from kiln_cluster.waiting import wait_until

Obj = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "digits-cnn.yaml"
TRAINING_TIMEOUT = 600.0
EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")


def collection(namespace: str) -> str:
    return f"/apis/{api.API_VERSION}/namespaces/{namespace}/{api.PLURAL}"


def path(namespace: str, name: str) -> str:
    return f"{collection(namespace)}/{name}"


def digits_job(name: str, **sections: Obj) -> Obj:
    """A small digits TrainingJob: the quick-start example's spec, trimmed for tests, with `sections` merged in."""
    spec: Obj = {
        "model": {"architecture": "small-cnn"},
        "data": {"dataset": "digits", "numWorkers": 0, "maxSamples": 600},
        "training": {"epochs": 2, "batchSize": 64, "optimizer": {"learningRate": 0.003}},
        "export": {"variants": ["fp32"], "calibration": {"samples": 64}},
        "resources": {"cpu": "1", "memory": "2Gi"},
        "serving": {"enabled": False},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def example() -> Obj:
    """deploy/examples/digits-cnn.yaml as a user would `kubectl apply -f` it."""
    manifest: Obj = yaml.safe_load(EXAMPLE.read_text())
    return copy.deepcopy(manifest)


def status_of(kube: Kube, namespace: str, name: str) -> Obj:
    status: Obj = kube.get(path(namespace, name)).get("status") or {}
    return status


def wait_for_phase(
    kube: Kube,
    namespace: str,
    name: str,
    phases: tuple[str, ...],
    timeout: float = TRAINING_TIMEOUT,
    describe: Callable[[], str] | None = None,
) -> Obj:
    """Wait until the TrainingJob's phase is one of `phases`; return its status."""

    def reached() -> Obj | None:
        status = status_of(kube, namespace, name)
        return status if status.get("phase") in phases else None

    def explain() -> str:
        extra = describe() if describe else ""
        return f"status: {status_of(kube, namespace, name)}\n{extra}"

    return wait_until(reached, timeout, f"{namespace}/{name} to reach {' or '.join(phases)}", describe=explain)


def condition(status: Obj, kind: str) -> Obj:
    found: list[Obj] = [c for c in status.get("conditions") or [] if c["type"] == kind]
    return found[0] if found else {}


class StatusRecorder:
    """Watches one TrainingJob and records every status it passes through, so tests can check the sequence
    of phases and progress without racing a poll against fast transitions."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.statuses: list[Obj] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"record-{name}", daemon=True)

    def __enter__(self) -> "StatusRecorder":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        selector = f"metadata.name={self.name}"
        while not self._stop.is_set():
            try:
                listing = self.kube.get(collection(self.namespace), fieldSelector=selector)
                for item in listing.get("items") or []:
                    self._record(item)
                version = listing["metadata"]["resourceVersion"]
                for event in self.kube.watch(
                    collection(self.namespace), version, timeout_seconds=5, fieldSelector=selector
                ):
                    if self._stop.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._record(event["object"])
            except (ApiError, OSError):
                self._stop.wait(0.5)

    def _record(self, obj: Obj) -> None:
        status = obj.get("status") or {}
        if not self.statuses or self.statuses[-1] != status:
            self.statuses.append(status)

    @property
    def phases(self) -> list[str]:
        """Distinct phases in the order they were first seen."""
        seen: list[str] = []
        for status in self.statuses:
            phase = status.get("phase")
            if phase and phase not in seen:
                seen.append(phase)
        return seen

    def epochs_while(self, phase: str) -> list[int]:
        """progress.epoch values reported while the job was in `phase`."""
        return [
            s["progress"]["epoch"]
            for s in self.statuses
            if s.get("phase") == phase and (s.get("progress") or {}).get("epoch") is not None
        ]


def digits_inputs(card: Obj, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` real digits, prepared as the model card's preprocessing says (and as the trainer loads them:
    8x8 greyscale upscaled bilinearly to imageSize, rounded to 8-bit, replicated to the card's channels)."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    prep = card["preprocessing"]
    size, channels = int(prep["imageSize"]), int(prep.get("channels", 3))
    grey = torch.from_numpy(digits.images[:count].astype(np.float32) / 16.0).unsqueeze(1)
    big = torch.nn.functional.interpolate(grey, size=(size, size), mode="bilinear")
    pixels = (big.clamp(0, 1) * 255).round() / 255.0
    images = pixels.expand(-1, channels, -1, -1).numpy()
    mean = np.array(prep["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.array(prep["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((images - mean) / std).astype(np.float32), digits.target[:count]


def trainer_pods(kube: Kube, namespace: str, name: str) -> list[Obj]:
    """The TrainingJob's trainer pods, oldest first."""
    selector = f"{constants.LABEL_TRAININGJOB}={name},{constants.LABEL_COMPONENT}=trainer"
    pods = kube.list(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector)
    return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])


def output_dir(cluster: Any, namespace: str, name: str) -> Path:
    """A TrainingJob's output folder (checkpoints, model card, compiled models) on the chart's artifacts claim:
    <namespace>/<name>/<uid>, as the operator lays it out; `cluster` is the e2e tier's kiln_cluster.Cluster."""
    uid = cluster.kube.get(path(namespace, name))["metadata"]["uid"]
    folder: Path = cluster.claim_path(namespace, "kiln-artifacts") / namespace / name / uid
    return folder


def saved_epochs(checkpoints: Path) -> list[int]:
    """Epochs with a checkpoint file (epoch-NNNN.pt), ascending."""
    if not checkpoints.is_dir():
        return []
    return sorted(int(m.group(1)) for p in checkpoints.iterdir() if (m := EPOCH_FILE.match(p.name)))


def wait_for_first_checkpoint(checkpoints: Path, describe: Callable[[], str] | None = None) -> None:
    """Block until a trainer has written its first epoch's checkpoint (polled fast: tests kill right after)."""
    wait_until(
        lambda: saved_epochs(checkpoints), TRAINING_TIMEOUT, "the first checkpoint", describe=describe, interval=0.05
    )


def logged_epochs(log: str) -> list[int]:
    """Epochs a trainer finished, from its JSON progress lines."""
    epochs = []
    for line in log.splitlines():
        if line.startswith("{") and '"event": "epoch"' in line:
            epochs.append(int(json.loads(line)["epoch"]))
    return epochs
