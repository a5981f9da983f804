"""kiln: a Kubernetes-native training operator with compiled inference.

This core package holds only what every component shares: the TrainingJob API (``kiln.api``) and the
``kiln`` command (``kiln.cli``). It never imports torch, onnxruntime or kopf at module level.
"""

__version__ = "0.1.0"
