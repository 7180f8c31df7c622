"""unickpt's JAX/Flax adapter plugin.

Registered under the ``unickpt.adapters`` entry-point group; importing this package does not
import jax.  The adapter itself lives in :mod:`unickpt_jax.adapter` and is loaded only when an
object from jax, flax or optax appears in a state.
"""

from unickpt.adapters import Plugin


def _load():
    from .adapter import JaxAdapter

    return JaxAdapter()


plugin = Plugin(name="jax", modules=("jax", "jaxlib", "flax", "optax"), load=_load)
