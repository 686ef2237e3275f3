"""Deployment material: the example services, compose files and Kubernetes manifests."""
