"""Shared by every test tier. The cluster harness the tiers use (control plane, node, Prometheus, the chart's
operator) is the `kiln_cluster` package in hack/kiln_cluster, installed with kiln's dev extra; `make cluster`
runs the same code for people."""
