"""The lab: how icemap's networks are made, apart from the product that runs them.

Chips and splits (:mod:`~icemap.lab.data`), training and fine-tuning (:mod:`~icemap.lab.train`),
the radiometric augmentation (:mod:`~icemap.lab.augment`), the study tables
(:mod:`~icemap.lab.experiment`), the shipped default model's recipe and real-data scoring
(:mod:`~icemap.lab.default`, ``python -m icemap.lab.default``), importing networks trained
elsewhere (:mod:`~icemap.lab.onnx_import`) and their commands (:mod:`~icemap.lab.cli`).

The lab sits above :mod:`icemap.workflow`: it uses the product (the network runtime in
:mod:`icemap.model`, :mod:`icemap.infer`, the workflow) and nothing in the product imports it.
Only the package's faces reach it: the ``icemap`` command registers the lab's commands and
``icemap.train`` (and the other lab names of the lazy public API) import it on first use.
Importing this package imports nothing.
"""
