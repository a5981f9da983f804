"""Test utilities that stand in for a Kubernetes cluster on a machine without Docker.

`controlplane` starts a real etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback;
`kubelet` is a node agent (a test double for the kubelet) that runs the pods bound to its node as local
processes; `prometheus` runs a real Prometheus; `rest` is the small dict-in, dict-out API client they and
the tests share. Nothing here is product code: it exists so kiln's integration tests exercise the operator,
trainer and server against real Kubernetes controllers.
"""
