"""Writing rendered objects: one stream, or one file per object plus a kustomization.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pgwarden.kube.render import dump


def file_names(objects: list[dict[str, Any]]) -> list[str]:
    return [
        f"{i:02d}-{str(obj['kind']).lower()}-{obj['metadata']['name']}.yaml"
        for i, obj in enumerate(objects, 1)
    ]


def write_dir(objects: list[dict[str, Any]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    names = file_names(objects)
    written = []
    for name, obj in zip(names, objects, strict=True):
        path = out / name
        path.write_text(dump(obj))
        written.append(path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": names,
    }
    path = out / "kustomization.yaml"
    path.write_text(yaml.safe_dump(kustomization, sort_keys=False))
    written.append(path)
    return written


def read_objects(path: Path) -> list[dict[str, Any]]:
    """Objects from a stream file, or from every *.yaml in a directory (kustomization skipped)."""
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    objects: list[dict[str, Any]] = []
    for file in files:
        for doc in yaml.safe_load_all(file.read_text()):
            if isinstance(doc, dict) and doc.get("kind") != "Kustomization":
                objects.append(doc)
    return objects
