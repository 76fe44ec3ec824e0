"""The U-Net: architecture, inputs, checkpoints, training data and training.

``icemap.model.inputs`` and ``icemap.model.checkpoint.read_metadata`` need no torch; the rest
imports torch, which is why nothing here is imported by ``import icemap``.
"""
