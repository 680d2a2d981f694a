"""Tokenizers: images <-> continuous latents or discrete codes on a token grid.

``base`` (the interface and :class:`~flopmatch.tokenizers.base.TokenizerSpec`), weight-free ``patch`` and
``kmeans``, learned ``kl`` and ``lfq`` (shared body in ``learned``, config in ``autoencoder``, trainer in
``train_ae``) and ``registry`` (build, fit and load any kind). Import the module you need.
"""
