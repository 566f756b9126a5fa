"""``hesslab demo``: train the four digits networks, measure them, write the run folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesslab._results import jsonable
from hesslab.analysis.pipeline import MEASURES, error_text

from ._blocks import BlocksAnalysis, blocks_analysis, record_blocks
from ._config import DemoConfig
from ._cost import CostLog
from ._kfac import KfacAnalysis, kfac_analysis, record_kfac, seed_overlaps
from ._measure import ModelAnalysis, measure_model, record_model, summary_rows
from ._output import summary_header, write_outputs
from ._rank import rank_analysis, rank_summary
from ._stages import Stages, guard, warnings_as_log

__all__ = ["run_demo", "LABELS"]

#: The demo's networks: an MLP and a CNN, each without and with BatchNorm.
LABELS = ("mlp", "mlp_bn", "cnn", "cnn_bn")
#: The models whose per-block spectra the demo compares: its transformer and the MLP.
BLOCK_LABELS = ("transformer", "mlp")


def run_demo(
    out: str | Path = "hesslab-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    verbose: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the whole demo and write its folder; returns the summary (also ``summary.json``).

    Args:
        out: The output folder (created; files in it are overwritten).
        quick: The small preset (about a fifth of the work).
        seed: Seed of the data split, the models' initialisation, training and every
            random vector.
        progress: Progress bars (None: when stderr is a terminal).
        verbose: Log lines on stderr.
        threads: torch intra-op threads during the run (restored after). One is the
            fastest for these tiny models (on a 2-core machine two threads were 3–8×
            slower, mostly synchronisation); None keeps torch's setting.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        run = _DemoRun(Path(out), DemoConfig.make(quick), seed, progress, verbose)
        models, trackers = run.train_all()
        analyses = run.spectra(models)
        kfacs, seeds = run.kronecker(models)
        rank = run.ranks()
        histories = run.tracking(trackers)
        blocks = run.block_spectra(models)
        return run.finish(analyses, kfacs, seeds, rank, histories, blocks)
    finally:
        torch.set_num_threads(before)


class _DemoRun:
    """One run of the demo: its settings, data, progress, result store and summary."""

    def __init__(self, out: Path, cfg: DemoConfig, seed: int, progress: bool | None, verbose: bool):
        from hesslab import zoo
        from hesslab.report import ResultStore

        self.out, self.cfg, self.seed = out, cfg, seed
        out.mkdir(parents=True, exist_ok=True)
        self.store = ResultStore(out)
        torch.manual_seed(seed)
        num_stages = 4 + 1 + 4 * 5 + len(cfg.kfac_models) * 5 + 3 + 2 + 2 + 1 + len(BLOCK_LABELS)
        self.stages = Stages(num_stages, progress=progress, verbose=verbose, desc="hesslab demo")
        self.loss_fn = nn.CrossEntropyLoss()
        (Xtr, ytr), (Xte, yte) = zoo.digits(image=False, seed=seed)
        (Itr, _), (Ite, _) = zoo.digits(image=True, seed=seed)
        self.train_data = {"mlp": (Xtr, ytr), "cnn": (Itr, ytr)}
        self.test_data = {"mlp": (Xte, yte), "cnn": (Ite, yte)}
        n_h = min(cfg.hessian_samples, len(ytr))
        self.hess_data = {"mlp": (Xtr[:n_h], ytr[:n_h]), "cnn": (Itr[:n_h], ytr[:n_h])}
        self.summary: dict[str, Any] = {
            **summary_header("demo", seed), "quick": cfg.quick,
            "data": {"name": "scikit-learn digits (8×8, 10 classes)", "train": int(len(ytr)), "test": int(len(yte)),
                     "hessian_samples": int(n_h)},
            "config": jsonable(dataclasses.asdict(cfg)), "training": {}, "models": {}, "kfac": {}, "tracking": {},
            "rank": {}, "unavailable": {}, "errors": {}, "files": {}, "transformer": {}, "block_spectra": {},
        }
        self.stages.log(f"hesslab demo ({'quick' if cfg.quick else 'full'}), seed {seed}, "
                        f"{torch.get_num_threads()} threads, writing to {out}")

    # ------------------------------------------------------------------ training
    def train_all(self) -> tuple[dict[str, nn.Module], dict[str, Any]]:
        """Train every network, keeping checkpoints (and the tracker's measurements)."""
        models: dict[str, nn.Module] = {}
        trackers: dict[str, Any] = {}
        for label in LABELS:
            models[label], tracker = self._train(label)
            if tracker is not None:
                trackers[label] = tracker
        return models, trackers

    def _tracker(self, label: str, model: nn.Module) -> Any:
        """A SpectrumTracker for ``label`` when the config asks for one (None otherwise)."""
        from hesslab.tracking import SpectrumTracker

        cfg = self.cfg
        if label not in cfg.tracking_models:
            return None
        ds, dp = cfg.tracking_density
        measures = ("top_k", "density", "power_law", "concentration") + (("trace",) if cfg.tracking_trace else ())
        try:
            return SpectrumTracker(
                model, self.loss_fn, self.hess_data[label.split("_")[0]], every=1, measures=measures,
                path=self.out / "tracking" / f"{label}.jsonl", k=cfg.tracking_k, overwrite=True, seed=self.seed,
                lanczos_options={"tol": 1e-5}, density_options={"num_steps": ds, "num_probes": dp},
                trace_options={"num_matvecs": max(cfg.tracking_trace, 3)}, on_error="warn",
            )
        except Exception as exc:  # noqa: BLE001 - the demo goes on without this model's tracking
            self.summary["unavailable"][f"tracking {label}"] = error_text(exc)
            return None

    def _train(self, label: str) -> tuple[nn.Module, Any]:
        from hesslab import zoo

        cfg, out = self.cfg, self.out
        kind, bn = label.split("_")[0], label.endswith("_bn")
        model = zoo.digits_mlp(batchnorm=bn, seed=self.seed) if kind == "mlp" else \
            zoo.digits_cnn(batchnorm=bn, seed=self.seed)
        tracker = self._tracker(label, model)
        ckpt_dir = out / "checkpoints"
        ckpt_dir.mkdir(exist_ok=True)
        checkpoints: list[str] = []

        def keep(epoch: int, m: nn.Module) -> None:
            if epoch in cfg.checkpoint_epochs:
                path = ckpt_dir / f"{label}_epoch{epoch:03d}.pt"
                torch.save(m.state_dict(), path)
                checkpoints.append(str(path.relative_to(out)))
                if tracker is not None:
                    with warnings_as_log(self.stages, f"tracking {label}"):
                        tracker.measure(epoch)

        num_params = int(sum(p.numel() for p in model.parameters()))
        what = f" + spectrum at epochs {list(cfg.checkpoint_epochs)}" if tracker is not None else ""
        with self.stages.stage(f"train {label} ({num_params} parameters, {cfg.epochs} epochs){what}"):
            keep(0, model)
            losses = zoo.train(model, self.train_data[kind], epochs=cfg.epochs, seed=self.seed, loss_fn=self.loss_fn,
                               on_epoch=lambda e, m: keep(e + 1, m))
        self.summary["training"][label] = {
            "num_params": num_params, "epochs": cfg.epochs, "train_loss": [float(x) for x in losses],
            "train_accuracy": zoo.accuracy(model, self.train_data[kind]),
            "test_accuracy": zoo.accuracy(model, self.test_data[kind]),
            "checkpoint_epochs": list(cfg.checkpoint_epochs), "checkpoints": checkpoints, "batchnorm": bn,
        }
        return model, tracker

    # ------------------------------------------------------------------ measuring
    def spectra(self, models: dict[str, nn.Module]) -> dict[str, ModelAnalysis]:
        """The pipeline's measures on every trained network."""
        analyses: dict[str, ModelAnalysis] = {}
        for label in LABELS:
            analyses[label] = measure_model(
                label, models[label], self.loss_fn, self.hess_data[label.split("_")[0]], MEASURES,
                k=self.cfg.k_concentration, k_top=self.cfg.k_top, seed=self.seed, budget=self.cfg.budget,
                store=self.store, stages=self.stages)
            record_model(self.summary, label, analyses[label])
        return analyses

    def kronecker(self, models: dict[str, nn.Module]) -> tuple[dict[str, KfacAnalysis], dict[str, Any]]:
        """Kronecker factors against exact layer blocks, and the overlap across two seeds."""
        cfg, stages = self.cfg, self.stages
        kfacs: dict[str, KfacAnalysis] = {}
        for label in cfg.kfac_models:
            kfacs[label] = kfac_analysis(label, models[label], self.loss_fn, self.hess_data[label.split("_")[0]],
                                         k=cfg.budget.layer_k, num_classes=10, seed=self.seed, store=self.store,
                                         stages=stages)
            record_kfac(self.summary, label, kfacs[label])
        seeds: dict[str, Any] = {}
        if "mlp" not in kfacs or kfacs["mlp"].kfac is None:
            return kfacs, seeds
        errors: dict[str, str] = {}
        with stages.stage(f"second MLP (seed {self.seed + 1}): overlap of Kronecker eigenspaces across seeds"), \
                guard(errors, "kfac seeds", stages):
            seeds = seed_overlaps(kfacs["mlp"].kfac, self.seed, cfg.second_seed_epochs, cfg.budget.layer_k,
                                  self.train_data["mlp"], self.hess_data["mlp"], self.loss_fn)
            for key, curve in seeds.items():
                self.store.save(f"mlp/kfac/seeds_{key}", curve)
            mid = {key: len(curve.ks) // 2 - 1 for key, curve in seeds.items()}
            self.summary["kfac"]["seeds"] = {
                curve.label: {"k": int(curve.ks[mid[key]]), "overlap": float(curve.overlaps[mid[key]]),
                              "random": float(curve.random_baseline[mid[key]]),
                              "overlap_k1": float(curve.overlaps[0]), "overlap_kmax": float(curve.overlaps[-1])}
                for key, curve in seeds.items()}
        self.summary["errors"].update(errors)
        return kfacs, seeds

    def ranks(self) -> dict[str, Any]:
        """Ranks of deep linear networks against Singh et al.'s formulas."""
        rank = rank_analysis(self.cfg.rank_hidden, self.cfg.rank_samples, seed=self.seed, store=self.store,
                             stages=self.stages)
        if rank["errors"]:
            self.summary["errors"]["rank"] = rank["errors"]
        self.summary["rank"] = rank_summary(rank)
        return rank

    def tracking(self, trackers: dict[str, Any]) -> dict[str, Any]:
        """Each tracker's history, saved, with its outliers, concentration and λ₁ per epoch."""
        histories: dict[str, Any] = {}
        for label, tracker in trackers.items():
            try:
                h = tracker.history()
                histories[label] = h
                self.store.save(f"{label}/tracking", h)
                steps, counts = h.outlier_counts()
                c_steps, conc = h.concentration()
                t_steps, lam = h.top_eigenvalues()
                self.summary["tracking"][label] = jsonable({
                    "epochs": h.steps, "outliers": dict(zip(steps.tolist(), counts.tolist())),
                    "concentration": dict(zip(c_steps.tolist(), conc.tolist())),
                    "lambda_1": dict(zip(t_steps.tolist(), lam[:, 0].tolist())) if len(t_steps) else {},
                })
            except Exception as exc:  # noqa: BLE001 - the report says what is missing
                self.summary["errors"][f"tracking {label}"] = error_text(exc)
        return histories

    def block_spectra(self, models: dict[str, nn.Module]) -> dict[str, BlocksAnalysis]:
        """Train the transformer (rows of the digits as a sequence), then the per-block
        spectra of it and of the MLP (Zhang et al. 2024)."""
        from hesslab import zoo

        cfg = self.cfg
        model = zoo.digits_transformer(seed=self.seed)
        num_params = int(sum(p.numel() for p in model.parameters()))
        errors: dict[str, str] = {}
        with self.stages.stage(f"train transformer ({num_params} parameters, {cfg.transformer_epochs} epochs)"), \
                guard(errors, "train transformer", self.stages):
            losses = zoo.train(model, self.train_data["mlp"], epochs=cfg.transformer_epochs, seed=self.seed,
                               loss_fn=self.loss_fn)
            self.summary["transformer"] = {
                "num_params": num_params, "epochs": cfg.transformer_epochs, "train_loss": [float(x) for x in losses],
                "train_accuracy": zoo.accuracy(model, self.train_data["mlp"]),
                "test_accuracy": zoo.accuracy(model, self.test_data["mlp"])}
            models = {**models, "transformer": model}
        self.summary["errors"].update(errors)
        costs = CostLog(self.stages, self.seed)
        out: dict[str, BlocksAnalysis] = {}
        for label in BLOCK_LABELS:
            if label not in models:
                continue
            out[label] = blocks_analysis(label, models[label], self.loss_fn, self.hess_data["mlp"],
                                         num_steps=cfg.budget.blocks_steps, num_probes=cfg.budget.blocks_probes,
                                         seed=self.seed, store=self.store, stages=self.stages, cost_log=costs)
            record_blocks(self.summary, out[label])
        return out

    # -------------------------------------------------------------------- output
    def finish(self, analyses: dict[str, ModelAnalysis], kfacs: dict[str, KfacAnalysis], seeds: dict[str, Any],
               rank: dict[str, Any], histories: dict[str, Any],
               blocks: dict[str, BlocksAnalysis] | None = None) -> dict[str, Any]:
        """The summary's manifest and table, the report and ``summary.json``."""
        from ._report import build_demo_report

        summary = self.summary
        summary["results"] = self.store.entries
        summary["files"] = {"checkpoints": sorted(str(p.relative_to(self.out))
                                                  for p in (self.out / "checkpoints").glob("*.pt"))}
        headers, rows = summary_rows(analyses, summary["training"])
        summary["table"] = {"headers": headers, "rows": jsonable(rows)}
        return write_outputs(self.out, summary, lambda: build_demo_report(
            summary, analyses, kfacs, seeds, rank, histories, self.stages, blocks), self.stages)
