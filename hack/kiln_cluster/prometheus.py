"""A real Prometheus (the `prometheus` binary hack/install-node-tools.sh builds: Debian's lacks kubernetes_sd) scraping.

Scrape targets are files Prometheus watches (`file_sd_configs`), so tests add targets once they know a pod's
IP or the operator's port: `prom.scrape("serving", ["127.3.0.7:8080"])`. Every job scrapes every second.
`query()` runs PromQL through the HTTP API.
"""

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kiln_cluster import binaries
from kiln_cluster.controlplane import free_port
from kiln_cluster.procs import Process
from kiln_cluster.waiting import wait_until


def skip_reason() -> str | None:
    """Why Prometheus cannot run here, or None."""
    if binaries.find("prometheus") is None:
        return "the prometheus binary is not installed: run `make test` (hack/install-node-tools.sh builds it)"
    return None


def kubernetes_pods_job(kubeconfig: Path) -> dict[str, Any]:
    """The conventional annotation-driven pod scrape job (as in Prometheus' own kubernetes example config)."""
    annotation = "__meta_kubernetes_pod_annotation_prometheus_io_"
    return {
        "job_name": "kubernetes-pods",
        "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
        "relabel_configs": [
            {"source_labels": [f"{annotation}scrape"], "action": "keep", "regex": "true"},
            {
                "source_labels": [f"{annotation}path"],
                "action": "replace",
                "target_label": "__metrics_path__",
                "regex": "(.+)",
            },
            {
                "source_labels": ["__address__", f"{annotation}port"],
                "action": "replace",
                "regex": r"([^:]+)(?::\d+)?;(\d+)",
                "replacement": "$1:$2",
                "target_label": "__address__",
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "target_label": "component"},
        ],
    }


class Prometheus:
    """One Prometheus server with its own config, TSDB folder and port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.targets = root / "targets"
        self.targets.mkdir(parents=True, exist_ok=True)
        self.proc: Process | None = None
        self.url = ""

    def start(self, jobs: tuple[str, ...] = ("serving", "operator", "trainer")) -> None:
        """Start with one file-discovered scrape job per name in `jobs` (targets added later by `scrape`)."""
        scrape_configs = [
            {
                "job_name": job,
                "file_sd_configs": [{"files": [str(self.targets / f"{job}.json")], "refresh_interval": "1s"}],
            }
            for job in jobs
        ]
        for job in jobs:
            self.scrape(job, [])
        self._run(scrape_configs)

    def start_kubernetes_pods(self, kubeconfig: Path) -> None:
        """Start discovering pods through the API server, as the usual `kubernetes-pods` job does: pods annotated
        `prometheus.io/scrape: "true"` are scraped at their IP on `prometheus.io/port`, path `prometheus.io/path`."""
        self._run([kubernetes_pods_job(kubeconfig)])

    def _run(self, scrape_configs: list[dict[str, Any]]) -> None:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": scrape_configs,
        }
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(config))
        binary = binaries.find("prometheus")
        assert binary is not None, skip_reason()
        for _attempt in range(3):
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            proc = self.proc = Process(
                "prometheus",
                [
                    str(binary),
                    f"--config.file={self.root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                self.root / "prometheus.log",
            )

            def up(p: Process = proc) -> bool:
                return p.poll() is not None or self._ready()

            wait_until(up, 60, "Prometheus to be ready", describe=proc.tail)
            if proc.poll() is None:
                return
            if "address already in use" not in proc.tail(100):
                break
        raise RuntimeError(f"prometheus exited at start\n{self.proc.tail() if self.proc else ''}")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop(grace=10)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def scrape(self, job: str, targets: list[str], labels: dict[str, str] | None = None) -> None:
        """Replace the scrape targets of `job` ("host:port" strings); Prometheus picks them up within seconds."""
        entry = [{"targets": targets, "labels": labels or {}}] if targets else []
        staging = self.targets / f".{job}.json.tmp"
        staging.write_text(json.dumps(entry))
        staging.replace(self.targets / f"{job}.json")  # atomic, so Prometheus never reads half a file

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector: [{metric: {labels}, value: [ts, "value"]}, ...]."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql, "time": f"{time.time():.3f}"})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets_health(self) -> list[dict[str, Any]]:
        """Active targets with their health and last error, for failure messages."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as answer:
            active: list[dict[str, Any]] = json.load(answer)["data"]["activeTargets"]
        return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")} for t in active]
