"""The serving side of a reconcile: converge the serving Service, PodDisruptionBudget, Deployment and HPA to
the spec, the reported model and the operator's config, or remove them when serving is disabled."""

from collections.abc import Mapping
from typing import Any

from kiln import api
from kiln_operator import config, kube, objects, serving_objects

Body = Mapping[str, Any]


def apply_serving(client: kube.Kube, cfg: config.OperatorConfig, body: Body, spec: api.TrainingJobSpec) -> None:
    """Create or converge the serving Service, PodDisruptionBudget, Deployment and HPA to the current spec,
    model and config.

    HPAs are touched only when the operator autoscales (the chart grants their verbs only then). Replicas
    follow serving_objects' rules: fixed replicas are applied after a stale HPA is gone; an autoscaled
    Deployment is created with the HPA's minimum and then applied without replicas.
    """
    owner = objects.Owner.from_body(body)
    reported = (body.get("status") or {}).get("model")
    model = api.ModelStatus.model_validate(reported) if reported else None
    name = objects.serving_name(owner.name)
    client.apply(serving_objects.build_service(owner))
    if serving_objects.needs_disruption_budget(spec, cfg):
        client.apply(serving_objects.build_disruption_budget(owner))
    else:
        client.delete(serving_objects.PDB_API_VERSION, serving_objects.PDB_KIND, owner.namespace, name)
    deployment = serving_objects.build_deployment(owner, spec, cfg, model)
    if not serving_objects.autoscaled(spec, cfg):
        if cfg.serving_hpa_enabled:  # scaled to zero or no CPU request: fixed replicas, no HPA
            client.delete(serving_objects.HPA_API_VERSION, serving_objects.HPA_KIND, owner.namespace, name)
        client.apply(deployment)
        return
    autoscaler = serving_objects.build_autoscaler(owner, spec, cfg)
    if not client.create_if_absent(serving_objects.with_replicas(deployment, autoscaler["spec"]["minReplicas"])):
        live = client.get("apps/v1", "Deployment", owner.namespace, name)
        if live is not None and serving_objects.applies_replicas(live):
            client.apply(serving_objects.build_replicas_handoff(live), serving_objects.HANDOFF_MANAGER)
        client.apply(deployment)
    client.apply(autoscaler)


def remove_serving(client: kube.Kube, cfg: config.OperatorConfig, namespace: str, name: str) -> bool:
    """Delete the serving HPA, Deployment, PodDisruptionBudget and Service (serving was disabled); True if
    anything was deleted."""
    serving = objects.serving_name(name)
    deleted = False
    if cfg.serving_hpa_enabled:  # first, so it never scales a Deployment that is going away
        deleted = client.delete(serving_objects.HPA_API_VERSION, serving_objects.HPA_KIND, namespace, serving)
    deleted = client.delete("apps/v1", "Deployment", namespace, serving) or deleted
    deleted = client.delete(serving_objects.PDB_API_VERSION, serving_objects.PDB_KIND, namespace, serving) or deleted
    return client.delete("v1", "Service", namespace, serving) or deleted
