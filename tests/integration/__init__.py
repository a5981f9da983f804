"""A package, so that the tier's package-scoped fixtures (the control plane, the operator) stop when its last test
ends: in a plain directory pytest keeps them up until the session ends, under every later tier."""
