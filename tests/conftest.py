"""Shared by every test tier. Its presence puts tests/ on sys.path, so tests import the `kube` test utilities
(tests/kube: control plane, node agent, Prometheus) as `from kube import ...`."""
