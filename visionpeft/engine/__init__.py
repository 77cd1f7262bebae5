"""The training engine: everything that runs a model on data.

- :mod:`~visionpeft.engine.experiment`: the YAML experiment config (dataclasses, ``_base_``, overrides);
- :mod:`~visionpeft.engine.build`: the timm backbone (hub, local or embedded weights) and the adapted model;
- :mod:`~visionpeft.engine.trainer`: the training loop (AdamW, cosine schedule, accumulation, clipping, AMP,
  EMA, exact resume, DDP); :mod:`~visionpeft.engine.optim`, :mod:`~visionpeft.engine.checkpoint` and
  :mod:`~visionpeft.engine.distributed` are its parts;
- :mod:`~visionpeft.engine.pretrain`: the tiny embedded backbones pretrained on the digits 0-4, cached;
- :mod:`~visionpeft.engine.adapt`: adapting them to the digits 5-9 with one method (demo and learning tests).

The engine sits on :mod:`visionpeft.data` and :mod:`visionpeft.model`; the tools in ``tools/`` sit on it.
"""
