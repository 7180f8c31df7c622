"""Drop-in integrations with the trainers people already use.

Each submodule imports its framework only when it is imported itself; ``import unickpt``
never imports any of them.

* :mod:`unickpt.integrations.lightning`: ``UnickptCheckpointIO`` (a Lightning ``CheckpointIO``
  plugin), ``UnickptResume`` (RNG and data position) and ``ResumableDataLoader``.
* :mod:`unickpt.integrations.transformers`: ``UnickptTrainer`` / ``UnickptTrainerMixin``
  for the HF Transformers ``Trainer``.
* :mod:`unickpt.integrations.accelerate`: ``unwrap`` and ``DataPosition`` for objects
  returned by ``accelerator.prepare``.

See docs/integrations.md.
"""

__all__: list[str] = []
