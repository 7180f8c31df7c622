"""The adapter conformance suite (unickpt.testing.conformance) on the JAX/Flax adapter."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

from unickpt.testing.conformance import AdapterConformance  # noqa: E402


class TestJaxAdapter(AdapterConformance):
    adapter_name = "jax"

    def make_state(self, seed):
        params = {"w": jnp.arange(6.0).reshape(2, 3) + seed,
                  "b": jnp.full((3,), seed, jnp.bfloat16)}
        return {"params": params, "opt": optax.adam(1e-3).init(params),
                "key": jax.random.key(seed), "linear": nnx.Linear(2, 3, rngs=nnx.Rngs(seed))}

    def mutate(self, state):  # jax arrays are immutable; NNX modules are not
        lin = state["linear"]
        lin.kernel[...] = lin.kernel[...] + 1.0

    def make_mismatched(self):
        state = self.make_state(1)
        state["params"]["w"] = jnp.zeros((3, 3))
        state["linear"] = nnx.Linear(2, 4, rngs=nnx.Rngs(1))
        return state, ["params/w", "linear/kernel"]

    def unsupported_objects(self):
        return [jax.ShapeDtypeStruct((2,), jnp.float32)]
