"""Offline validation of rendered objects: Kubernetes' own schemas (strict, so unknown fields
fail) for core objects, then the checks schemas cannot express."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pgwarden.errors import UserError
from pgwarden.kube.bootstrap import is_bootstrap_file

SUPPORTED = ("1.29", "1.30", "1.31", "1.32", "1.33")
DEFAULT_VERSION = "1.33"
CRD_GROUPS = ("postgresql.cnpg.io", "barmancloud.cnpg.io")


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _name(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def schema_errors(objects: Iterable[dict[str, Any]], version: str) -> list[str]:
    import kubernetes_validate  # noqa: PLC0415 - heavy (bundled schemas): only when validating

    if version not in SUPPORTED:
        raise UserError(
            f"Kubernetes {version} is not supported for validation",
            hint=f"use one of {', '.join(SUPPORTED)}",
        )
    errors = []
    for obj in objects:
        if str(obj.get("apiVersion", "")).split("/")[0] in CRD_GROUPS:
            continue  # custom resources: checked against their CRDs elsewhere
        try:
            kubernetes_validate.validate(obj, f"{version}.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errors.append(f"{_name(obj)}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(
                f"{_name(obj)}: no schema for {obj.get('apiVersion')} in Kubernetes {version}"
            )
    return errors


def _selects(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    return all(labels.get(k) == v for k, v in selector.items())


def semantic_checks(objects: list[dict[str, Any]]) -> Report:
    report = Report()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(str(obj.get("kind")), []).append(obj)
    names = {(str(o.get("kind")), o.get("metadata", {}).get("name")) for o in objects}
    workloads = by_kind.get("StatefulSet", []) + by_kind.get("Deployment", [])
    for w in workloads:
        spec = w["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        wanted = spec["selector"].get("matchLabels", {})
        if any(labels.get(k) != v for k, v in wanted.items()):
            report.errors.append(f"{_name(w)}: selector {wanted} does not match the pod labels")
        pod = spec["template"]["spec"]
        for container in pod.get("containers", []):
            for kind, key in (("requests", "cpu"), ("requests", "memory")):
                if key not in container.get("resources", {}).get(kind, {}):
                    report.errors.append(
                        f"{_name(w)}: container {container['name']} sets no {kind}.{key}"
                    )
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ("Secret", ref["name"]) not in names:
                    report.warnings.append(
                        f"{_name(w)}: Secret {ref['name']} is not in this output: it must exist "
                        "in the cluster"
                    )
        for volume in pod.get("volumes", []):
            if "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in names:
                report.errors.append(
                    f"{_name(w)}: ConfigMap {volume['configMap']['name']} is missing"
                )
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and ("PersistentVolumeClaim", claim) not in names:
                report.errors.append(f"{_name(w)}: claim {claim} is missing")
        replicas = spec.get("replicas", 1)
        for template in spec.get("volumeClaimTemplates", []):
            modes = template["spec"].get("accessModes", [])
            if replicas > 1 and "ReadWriteMany" in modes:
                report.errors.append(f"{_name(w)}: {replicas} replicas on a ReadWriteMany claim")
        if replicas > 1 and any(v.get("persistentVolumeClaim") for v in pod.get("volumes", [])):
            report.errors.append(f"{_name(w)}: {replicas} replicas would share one claim")
    for svc in by_kind.get("Service", []):
        selector = svc["spec"].get("selector", {})
        matching = [w for w in workloads if _selects(selector, w)]
        if not matching:
            report.errors.append(f"{_name(svc)}: selects no pod of this output")
            continue
        ports = {
            p.get("name"): p["containerPort"]
            for w in matching
            for c in w["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if target not in ports and target not in ports.values():
                report.errors.append(f"{_name(svc)}: targetPort {target} is not a container port")
    for cluster in by_kind.get("Cluster", []):
        spec = cluster.get("spec", {})
        refs = spec.get("bootstrap", {}).get("initdb", {}).get("postInitApplicationSQLRefs", {})
        for ref in refs.get("configMapRefs", []):
            if ("ConfigMap", ref["name"]) not in names:
                report.errors.append(f"{_name(cluster)}: ConfigMap {ref['name']} is missing")
        for role in spec.get("managed", {}).get("roles", []):
            secret = role.get("passwordSecret", {}).get("name")
            if secret and ("Secret", secret) not in names:
                report.warnings.append(
                    f"{_name(cluster)}: role {role['name']} takes its password from Secret "
                    f"{secret} (kubernetes.io/basic-auth: username, password): create it in the "
                    "cluster"
                )
        if "resources" not in spec or "cpu" not in spec["resources"].get("requests", {}):
            report.errors.append(f"{_name(cluster)}: sets no CPU request")
    for cm in by_kind.get("ConfigMap", []):
        hba = cm.get("data", {}).get("pg_hba.conf")
        if hba is not None:
            for line in hba.splitlines():
                fields = line.split()
                if fields and not line.lstrip().startswith("#") and fields[-1] == "trust":
                    report.errors.append(f"{_name(cm)}: pg_hba.conf allows trust: {line.strip()}")
        for key, value in cm.get("data", {}).items():
            if re.search(r"(?i)password\s*[:=]", value) and not is_bootstrap_file(key):
                report.errors.append(f"{_name(cm)}: {key} seems to hold a password")
    return report


def validate_objects(objects: list[dict[str, Any]], version: str = DEFAULT_VERSION) -> Report:
    report = semantic_checks(objects)
    report.errors = schema_errors(objects, version) + report.errors
    return report
