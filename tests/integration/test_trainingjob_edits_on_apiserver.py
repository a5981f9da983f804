"""Issue 14 on the API server alone: immutable sections refused with what to do, runPolicy and serving edited
in place, the status conditions a map keyed by type, hostile volume sources refused at admission."""

from typing import Any

import pytest

from kiln import api
from kiln_cluster.rest import ApiError, Kube

TJ = "/apis/kiln.dev/v1alpha1/namespaces/{ns}/trainingjobs"
SECTIONS = {
    "model": {"architecture": "resnet18"},
    "data": {"maxSamples": 100},
    "training": {"epochs": 3},
    "evaluation": {"adversarial": {"epsilon": 0.1}},
    "export": {"variants": ["fp32", "fp16"]},
    "resources": {"workers": 4},
    "artifacts": {"volume": {"persistentVolumeClaim": {"claimName": "elsewhere"}}},
}


def trainingjob(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_editing_a_section_the_operator_cannot_act_on_is_refused_saying_what_to_do(
    kube: Kube, trainingjob_crd: dict[str, Any], namespace: str, section: str
) -> None:
    name = f"edit-{section}"
    kube.create(TJ.format(ns=namespace), trainingjob(name, {}))
    with pytest.raises(ApiError) as refused:
        kube.patch(f"{TJ.format(ns=namespace)}/{name}", {"spec": {section: SECTIONS[section]}})
    assert refused.value.status == 422
    assert f"{section} is immutable after creation; create a new TrainingJob" in refused.value.message


def test_run_policy_and_serving_may_be_edited_in_place(
    kube: Kube, trainingjob_crd: dict[str, Any], namespace: str
) -> None:
    kube.create(TJ.format(ns=namespace), trainingjob("editable", {}))
    edit = {"runPolicy": {"backoffLimit": 1, "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 30},
            "serving": {"replicas": 3, "enabled": False}}  # fmt: skip
    changed = kube.patch(f"{TJ.format(ns=namespace)}/editable", {"spec": edit})
    assert changed["spec"]["runPolicy"]["activeDeadlineSeconds"] == 600
    assert changed["spec"]["serving"]["replicas"] == 3 and changed["metadata"]["generation"] == 2


def test_status_conditions_are_a_map_keyed_by_type_so_an_apply_merges_them(
    kube: Kube, trainingjob_crd: dict[str, Any], namespace: str
) -> None:
    path = f"{TJ.format(ns=namespace)}/conditions"
    kube.create(TJ.format(ns=namespace), trainingjob("conditions", {}))

    def apply(manager: str, type_: str, status: str) -> dict[str, Any]:
        condition = {"type": type_, "status": status, "reason": "Test", "message": ""}
        meta = {"name": "conditions"}
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": meta,
            "status": {"conditions": [condition]},
        }
        params = {"fieldManager": manager, "force": True}
        result: dict[str, Any] = kube.request(
            "PATCH", f"{path}/status", body, params=params, content_type="application/apply-patch+yaml"
        )
        return result

    apply("a", "Succeeded", "True")
    merged = apply("b", "Ready", "False")  # another manager's entry is kept: the list is keyed by type
    assert {c["type"]: c["status"] for c in merged["status"]["conditions"]} == {"Succeeded": "True", "Ready": "False"}
    with pytest.raises(ApiError) as refused:
        kube.patch(f"{path}/status", {"status": {"conditions": [{"type": "Exported", "status": "True"}]}})
    assert refused.value.status == 422 and "Unsupported value" in refused.value.message
    table = kube.table(path)
    assert "Ready" in [c["name"] for c in table["columnDefinitions"]]
