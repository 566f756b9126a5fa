"""The demo's sizes (:class:`DemoConfig`), the work per measure (:class:`Budget`) and the
measures ``hesslab analyze`` offers."""

from __future__ import annotations

import dataclasses
from typing import Any

from hesslab.analysis.pipeline import DEFAULTS, MEASURES

__all__ = ["MEASURES", "ANALYZE_MEASURES", "REQUIRES", "Budget", "DemoConfig", "required_measures"]

#: What ``hesslab analyze`` offers: the pipeline's measures (:data:`MEASURES`), the
#: outliers (among the top eigenvalues and in the density), the Kronecker-factor
#: comparison and the per-block spectra; the demo runs them all on every model (kfac on
#: some, blocks on the transformer).
ANALYZE_MEASURES = MEASURES + ("outliers", "kfac", "blocks")

#: The measures each measure needs (they are run too when it is asked for).
REQUIRES: dict[str, tuple[str, ...]] = {
    "power_law": ("top_k",), "concentration": ("top_k",), "outliers": ("density",),
}


def required_measures(measures: Any) -> list[str]:
    """``measures`` with the ones they need (:data:`REQUIRES`), in the order of
    :data:`ANALYZE_MEASURES`. The outliers need the density unless the top eigenvalues are
    computed anyway (they are then looked for among those)."""
    wanted = set(measures)
    for m in list(wanted):
        needs = REQUIRES.get(m, ())
        if m == "outliers" and wanted & {"top_k", "power_law", "concentration"}:
            needs = ()
        wanted.update(needs)
    return [m for m in ANALYZE_MEASURES if m in wanted]


@dataclasses.dataclass
class Budget:
    """How much work each measure gets (products of the Hessian with vectors).

    The defaults are the pipeline's (:data:`hesslab.analysis.pipeline.DEFAULTS`);
    ``layer_k`` and ``layer_max_steps`` bound the Lanczos run on each exact layer block
    of the Kronecker comparison (None: the solver's own limit); ``blocks_steps`` and
    ``blocks_probes`` the SLQ of each block of the per-block spectra.
    """

    lanczos_tol: float = DEFAULTS["lanczos"]["tol"]
    slq_steps: int = DEFAULTS["density"]["num_steps"]
    slq_probes: int = DEFAULTS["density"]["num_probes"]
    slq_reorthogonalize: str = DEFAULTS["density"]["reorthogonalize"]
    density_grid: int = DEFAULTS["density"]["grid_size"]
    trace_matvecs: int = DEFAULTS["trace"]["num_matvecs"]
    layer_k: int = 20
    layer_max_steps: int | None = None
    blocks_steps: int = 30
    blocks_probes: int = 4

    def pipeline_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`hesslab.analysis.measure_spectrum` (Hutch++ gets at
        least the 3 products it needs)."""
        return {
            "lanczos_options": {"tol": self.lanczos_tol},
            "density_options": {"num_steps": self.slq_steps, "num_probes": self.slq_probes,
                                "grid_size": self.density_grid, "reorthogonalize": self.slq_reorthogonalize},
            "trace_options": {"num_matvecs": max(3, self.trace_matvecs)},
        }


@dataclasses.dataclass
class DemoConfig:
    """Sizes of the demo; ``DemoConfig.make(quick)`` gives the two presets."""

    quick: bool
    epochs: int
    checkpoint_epochs: tuple[int, ...]
    hessian_samples: int
    k_top: int
    k_concentration: int
    budget: Budget
    kfac_models: tuple[str, ...]
    tracking_models: tuple[str, ...]
    tracking_k: int
    tracking_density: tuple[int, int]
    tracking_trace: int
    rank_hidden: tuple[int, ...]
    rank_samples: int
    second_seed_epochs: int
    transformer_epochs: int

    @classmethod
    def make(cls, quick: bool) -> DemoConfig:
        if quick:
            return cls(
                quick=True, epochs=6, checkpoint_epochs=(0, 1, 2, 4, 6), hessian_samples=256, k_top=30,
                k_concentration=10,
                budget=Budget(lanczos_tol=1e-5, slq_steps=40, slq_probes=4, density_grid=2000, trace_matvecs=30,
                              layer_k=10, blocks_steps=15, blocks_probes=2),
                kfac_models=("mlp", "mlp_bn"), tracking_models=("mlp", "mlp_bn"), tracking_k=10,
                tracking_density=(30, 3), tracking_trace=0, rank_hidden=(1, 2, 4, 8, 12), rank_samples=48,
                second_seed_epochs=6, transformer_epochs=5,
            )
        return cls(
            quick=False, epochs=15, checkpoint_epochs=(0, 1, 2, 3, 5, 8, 11, 15), hessian_samples=1024, k_top=60,
            k_concentration=10, budget=Budget(),
            kfac_models=("mlp", "mlp_bn", "cnn"), tracking_models=("mlp", "mlp_bn"), tracking_k=10,
            tracking_density=(50, 6), tracking_trace=30, rank_hidden=(1, 2, 3, 4, 6, 8, 10, 12, 16), rank_samples=64,
            second_seed_epochs=15, transformer_epochs=15,
        )
