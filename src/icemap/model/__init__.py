"""The network runtime: the U-Net, input channel sets, checkpoints, the ONNX runner, the shipped model.

What :mod:`icemap.infer` needs to run a network, and nothing of how networks are made (that is
the lab, :mod:`icemap.lab`, which sits above the workflow; nothing here imports it).
``icemap.model.inputs``, ``icemap.model.packaged`` and ``icemap.model.checkpoint.read_metadata``
need no torch; the rest imports torch, which is why nothing here is imported by ``import icemap``.
"""
