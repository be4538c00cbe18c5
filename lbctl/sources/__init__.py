"""Sources of the model: Kubernetes objects parsed, watched (kube) or read from manifests."""
