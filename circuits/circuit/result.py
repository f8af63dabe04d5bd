"""A circuit's faithfulness: its accuracy with everything else mean-ablated, against random circuits
(made by :func:`circuits.circuit.faithfulness.faithfulness`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tunelens.results import Result

MIN_GAP = 0.05  # the full model must beat chance by this much for faithfulness to be defined


@dataclass(frozen=True, kw_only=True)
class CircuitResult(Result):
    """A circuit's head groups, its accuracy with everything else mean-ablated, and the random control."""

    title: ClassVar[str] = "circuit faithfulness"
    analysis: ClassVar[str] = "circuit"
    groups: dict[str, list[list]]
    model: str
    n_prompts: int
    acc_full: float
    acc_circuit: float
    acc_random: list[float]
    chance: float
    logit_diff_full: float
    logit_diff_circuit: float
    n_candidates_checked: int | None = None  # heads examined exactly before choosing the circuit
    scope: str = "all"
    provenance: dict[str, Any] = field(default_factory=dict)

    def _faith(self, acc: float) -> float:
        """Chance-corrected; NaN (undefined) when the full model is not above chance by MIN_GAP."""
        gap = self.acc_full - self.chance
        return (acc - self.chance) / gap if gap > MIN_GAP else float("nan")

    @property
    def defined(self) -> bool:
        return self.acc_full - self.chance > MIN_GAP

    @property
    def faithfulness(self) -> float:
        return self._faith(self.acc_circuit)

    @property
    def random_faithfulness(self) -> tuple[float, float]:
        """Mean and standard deviation over the random circuits."""
        if not self.acc_random:
            return float("nan"), float("nan")
        f = torch.tensor([self._faith(a) for a in self.acc_random])
        return float(f.mean()), float(f.std()) if len(f) > 1 else 0.0

    def to_frame(self):
        import pandas as pd

        rows = [
            {"group": g, "layer": h[0], "head": h[1], "position": h[2]}
            for g, hs in self.groups.items()
            for h in hs
        ]
        return pd.DataFrame(rows)

    def figure(self):
        import plotly.graph_objects as go

        rm, rs = self.random_faithfulness
        racc = float(torch.tensor(self.acc_random).mean()) if self.acc_random else float("nan")
        n_heads = sum(len(g) for g in self.groups.values())
        fig = go.Figure(
            go.Bar(
                x=[
                    "full model",
                    f"circuit ({n_heads} heads)",
                    f"random circuits ({len(self.acc_random)} draws)",
                ],
                y=[self.acc_full, self.acc_circuit, racc],
                text=(
                    ["", f"faithfulness {self.faithfulness:.2f}", f"faithfulness {rm:.2f} ± {rs:.2f}"]
                    if self.defined
                    else ["at or below chance: faithfulness undefined", "", ""]
                ),
                name="accuracy",
            )
        )
        fig.add_hline(y=self.chance, line_dash="dash", annotation_text=f"chance {self.chance:.2f}")
        fig.update_layout(
            title=f"Circuit faithfulness in {self.model}: everything outside the circuit mean-ablated",
            xaxis_title="what runs",
            yaxis_title=f"accuracy among the candidate answers ({self.n_prompts} prompts)",
        )
        return fig

    def summary(self) -> dict[str, Any]:
        rm, rs = self.random_faithfulness
        return {
            "model": self.model,
            "n_heads": len({(h[0], h[1]) for g in self.groups.values() for h in g}),
            "acc_full": round(self.acc_full, 3),
            "acc_circuit": round(self.acc_circuit, 3),
            "chance": round(self.chance, 3),
            "faithfulness": round(self.faithfulness, 3) if self.defined else None,
            "random_faithfulness": [round(rm, 3), round(rs, 3)] if self.defined else None,
            **({} if self.defined else {"note": "undefined: the full model is not above chance"}),
            "n_candidates_checked": self.n_candidates_checked,
            "scope": self.scope,
        }
