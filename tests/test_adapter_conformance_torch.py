"""The adapter conformance suite (unickpt.testing.conformance) on the torch adapter."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from unickpt.testing.conformance import AdapterConformance  # noqa: E402


def _model(seed: int, width: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.BatchNorm1d(width))


class TestTorchAdapter(AdapterConformance):
    adapter_name = "torch"

    def make_state(self, seed):
        model = _model(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(torch.randn(4, 2)).sum().backward()
        opt.step()
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1 + seed)
        gen = torch.Generator().manual_seed(seed)
        return {"model": model, "opt": opt, "sched": sched, "gen": gen,
                "t": torch.arange(4, dtype=torch.bfloat16) + seed}

    def mutate(self, state):
        with torch.no_grad():
            for p in state["model"].parameters():
                p.add_(1.0)
            for s in state["opt"].state.values():
                s["exp_avg"].add_(1.0)
        state["t"].add_(7)
        torch.rand(3, generator=state["gen"])

    def make_mismatched(self):
        state = self.make_state(1)
        state["model"] = _model(1, width=5)
        state["t"] = torch.zeros(5, dtype=torch.bfloat16)
        return state, ['model/"0.weight"', "t"]

    def draw_random(self):
        return torch.rand(4)

    def unsupported_objects(self):
        return [torch.zeros(2).to_sparse()]
