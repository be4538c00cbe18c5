"""lbctl: an eBPF-accelerated L4 load balancer for Kubernetes Services."""

__version__ = "0.1.0"
