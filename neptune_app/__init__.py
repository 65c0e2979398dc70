"""neptune_app: the application built on the `neptune_ext` library.

The Neptune image classifier (:mod:`neptune_app.models`), its data sets
(:mod:`neptune_app.data`, scikit-learn's digits embedded), training, evaluation and prediction
(:mod:`neptune_app.train`), sampled mini-batch graph training (:mod:`neptune_app.sampled`),
the benchmarks (``neptune_app.bench``) and the `neptune` command (:mod:`neptune_app.cli`,
also ``python -m neptune_app``).

The application imports the library; the library never imports the application. Importing
this package imports nothing (no torch): the `neptune` command answers ``--help`` and
``--version`` without loading torch.
"""
