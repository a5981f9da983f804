"""The kiln operator: reconciles TrainingJobs into trainer Jobs and serving Deployments.

Importing this package loads nothing heavy (no kopf handlers, no torch, no onnxruntime); `kiln operator`
imports `kiln_operator.handlers` only when it starts the operator.
"""
