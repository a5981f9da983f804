"""A real control plane and `kiln operator` for the operator table (bench/operator_apply.py).

Uses kiln_cluster (hack/kiln_cluster): etcd, kube-apiserver and kube-controller-manager on loopback
(no scheduler and no node agent: the TrainingJobs are created suspended, so no pod is ever scheduled), the
committed CRD, and the operator run as a local process with the Helm chart's ServiceAccount, RBAC and
settings, exactly as the integration tests run it. One TrainingJob is applied and its Job awaited before
measuring, so the operator's watches are open and the timed apply sees a running operator, not a starting one.
Everything started here is stopped before returning (and dies with this process if it is killed).

    KILN_TEST_BIN=~/.cache/kiln/bin/<versions> python bench/run.py --quick --only operator
"""

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import audit
import operator_apply
import yaml

from kiln_cluster import binaries, chart
from kiln_cluster.controlplane import ControlPlane
from kiln_cluster.rest import ApiError, Kube
from kiln_cluster.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "charts" / "kiln" / "crds" / "trainingjob.yaml"
WARMUP_NAMESPACE = "kiln-bench-warmup"


def install_crd(kube: Kube, crd: dict[str, Any]) -> None:
    """Apply the CRD and wait until it is Established and its resource is served."""
    kube.apply_object(crd)
    name = crd["metadata"]["name"]
    group, version, plural = crd["spec"]["group"], crd["spec"]["versions"][0]["name"], crd["spec"]["names"]["plural"]

    def served() -> bool:
        try:
            current = kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = current.get("status", {}).get("conditions") or []
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
            return any(r["name"] == plural for r in kube.get(f"/apis/{group}/{version}")["resources"])
        except ApiError:
            return False

    wait_until(served, 60, f"{plural}.{group}/{version} to be served")


def warm_up(kube: Kube) -> float:
    """Apply one suspended TrainingJob and wait for its Job; return how long that took (seconds)."""
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": WARMUP_NAMESPACE}})  # fmt: skip
    began = time.monotonic()
    kube.create(
        f"/apis/kiln.dev/v1alpha1/namespaces/{WARMUP_NAMESPACE}/trainingjobs",
        {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "warmup"},
         "spec": operator_apply.SPEC},
    )  # fmt: skip
    wait_until(
        lambda: kube.get_or_none(f"/apis/batch/v1/namespaces/{WARMUP_NAMESPACE}/jobs/warmup-trainer"),
        120,
        "the warm-up TrainingJob's Job",
    )
    return time.monotonic() - began


def operator_table(quick: bool) -> str:
    """Start the control plane (auditing the operator's writes) and the operator, run bench/operator_apply.py's
    three bursts, stop everything, count the writes."""
    missing = chart.skip_reason()
    try:
        binaries.control_plane(scheduler=False)
    except LookupError as err:
        missing = str(err)
    if missing:
        raise SystemExit(f"operator table not run: {missing}")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-cluster-") as tmp:
        manifests = chart.render()
        # No kube-scheduler: nothing here is ever scheduled (the TrainingJobs are suspended, the plain Jobs'
        # Pods stay Pending). The audit log counts the operator's writes.
        operator_user = f"system:serviceaccount:{chart.RELEASE_NAMESPACE}:{chart.operator_account(manifests)}"
        plane = ControlPlane(Path(tmp) / "control-plane", scheduler=False, audit_policy=audit.policy(operator_user))
        plane.start()
        try:
            install_crd(plane.kube, yaml.safe_load(CRD_FILE.read_text()))
            alone = operator_apply.bare_trainingjobs(quick, str(plane.kubeconfig_path))  # before the operator
            operator = chart.KilnOperator(plane, manifests, Path(tmp) / "operator")
            operator.start()
            try:
                assert operator.proc is not None
                warm = warm_up(plane.kube)
                pids = {name: proc.pid for name, proc in plane.processes.items()}
                results = operator_apply.measure(quick, str(plane.kubeconfig_path), operator.proc.pid, pids)
            except BaseException:
                print(operator.tail(80), file=sys.stderr)
                raise
            finally:
                operator.stop()
        finally:
            plane.stop()  # flushes the audit log
        writes = audit.writes_per_trainingjob(plane.audit_log, results.namespace, results.names, "-trainer")
        markdown: str = operator_apply.render(results, writes, alone)
    started = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in plane.timings.items())
    return (
        markdown.rstrip()
        + "\n\nControl plane: etcd, kube-apiserver and kube-controller-manager on loopback (kiln_cluster; started in "
        + f"{started}); `kiln operator` as a local process with the Helm chart's ServiceAccount and RBAC; one "
        + f"warm-up TrainingJob → Job took {warm:.2f} s before the timed bursts.\n"
    )
