"""A package, so that the tier's package-scoped fixtures (the cluster, its release, Prometheus) are taken down when
its last test ends: in a plain directory pytest keeps them up until the session ends, under every later tier."""
