"""kiln's trainer: data → model → loop → checkpoints, then the compile step. Entry point: ``kiln train``.

Kept import-light on purpose: ``kiln_trainer.loop`` (torch) is imported by whoever trains.
"""
