"""unickpt's PyTorch adapter plugin.

Registered under the ``unickpt.adapters`` entry-point group; importing this package does not
import torch.  The adapter itself lives in :mod:`unickpt_torch.adapter` and is loaded only when
an object from torch appears in a state.
"""

from unickpt.adapters import Plugin


def _load():
    from .adapter import TorchAdapter

    return TorchAdapter()


plugin = Plugin(name="torch", modules=("torch",), load=_load)
