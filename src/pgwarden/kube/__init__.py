"""Kubernetes: render, validate and apply manifests from the `kubernetes` section."""
