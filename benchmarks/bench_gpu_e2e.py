"""GPU end to end: hesslab and its peers on ResNet-18 and a GPT-2-shaped transformer (issue 17.3).

Workloads (random init, fixed seeds, eval mode, float32, no download):
  resnet18  torchvision resnet18(num_classes=10) on CIFAR-10-shaped random data
            (3x32x32 images, 10 classes), batch 512 (--resnet-batch).
  gpt2      GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab 4096,
            eager attention: twice differentiable)), next-token cross-entropy on random
            token ids, batch 16 x 128 tokens (--gpt2-batch, --gpt2-seq).
Tasks: one product (median of 5 after a warm-up), top-10 eigenvalues, SLQ 90 steps x 8
probes, Hutchinson trace with 100 products; for hesslab also "compiled product": the same
single product with ``compile=True`` (inductor) against the eager kept graph, with the
compile time and the products after which it pays back (bench_compiled.measure; issue 15:
curvlinops measured 4.6x on a ResNet-18 on a GPU, unmeasured here so far).
Tools: hesslab always; PyHessian, hessian-eigenthings and curvlinops when they import
(through bench_peers' adapters, _peers_adapters.py, lazily; a missing one is skipped and named).

Figures per (model, tool, task): wall seconds (CUDA synchronised), products, and the
share of the time spent outside the products. For hesslab the operator's products are
timed directly (each product is synchronised before and after, so the share is measured);
for a peer it is estimated as 1 - products x (its single product time) / total.
Accuracy, against hesslab's own run where no exact answer exists at this size: top-10,
hesslab's max relative residual ||Hv - lv|| / |l| (measured) and a peer's max relative
deviation from hesslab's eigenvalues; SLQ, the 1-Wasserstein distance of a peer's
quadrature measure to hesslab's, over hesslab's spectral width; trace, hesslab's relative
standard error and a peer's relative deviation from hesslab's estimate.

--max-seconds bounds the whole run (gpu_suite.sh gives it a share of its 8 minutes):
tasks that would start after it are recorded as skipped. --quick shrinks everything
(a two-stage residual network of hesslab.zoo with 4 and 8 channels in place of ResNet-18,
on 6x6 images, batch 2; a one-layer GPT-2 of width 32; tiny task sizes) so
``--quick --device cpu`` runs in seconds (tests/test_device_e2e.py).

    python benchmarks/bench_gpu_e2e.py [--device cuda] [--quick] [--models resnet18,gpt2]
        [--tools hesslab,pyhessian,hessian-eigenthings,curvlinops] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, environment, sync, table, timeit  # noqa: E402

PEERS = {"pyhessian": "pyhessian", "hessian-eigenthings": "hessian_eigenthings", "curvlinops": "curvlinops"}
TASKS = ("product", "top10", "slq", "trace")


# ---------------------------------------------------------------------------- workloads
class SequenceCE(nn.Module):
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LogitsOnly(nn.Module):
    """A Hugging Face causal LM as a plain module: token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def build(name: str, args, device: str):
    """(model, loss_fn, (inputs, targets)) on the device, float32, eval mode."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "resnet18":
        if args.quick:  # the same residual family, 4 and 8 channels: ResNet-18 itself takes minutes on a CPU
            from hesslab.zoo import ResNet

            model = ResNet((4, 8), (1, 1), 3, 10)
        else:
            import torchvision

            model = torchvision.models.resnet18(num_classes=10)
        side, batch = (6, 2) if args.quick else (32, args.resnet_batch)
        X = torch.randn(batch, 3, side, side, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        loss = nn.CrossEntropyLoss()
    elif name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        if args.quick:
            cfg = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
            batch, seq = 2, 8
        else:
            cfg = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, n_positions=args.gpt2_seq)
            batch, seq = args.gpt2_batch, args.gpt2_seq
        config = GPT2Config(**cfg, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = LogitsOnly(GPT2LMHeadModel(config))
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), generator=gen)
        X, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        loss = SequenceCE()
    else:
        raise SystemExit(f"unknown model {name!r}; expected resnet18 or gpt2")
    model = model.to(device=device, dtype=torch.float32).eval()
    return model, loss, (X.to(device), y.to(device))


def sizes(args) -> dict:
    if args.quick:
        return {"k": 2, "top_steps": 5, "slq_steps": 5, "probes": 2, "trace": 4}
    return {"k": 10, "top_steps": None, "slq_steps": 90, "probes": 8, "trace": 100}


# ---------------------------------------------------------------------------- timing
class TimedProducts:
    """Wraps an operator's _matmat: synchronised wall time and columns of every product."""

    def __init__(self, op, device: str):
        self.seconds, self.columns, self.device = 0.0, 0, device
        inner = op._matmat

        def timed(V):
            sync(device)
            t0 = time.perf_counter()
            out = inner(V)
            sync(device)
            self.seconds += time.perf_counter() - t0
            self.columns += V.shape[1]
            return out

        op._matmat = timed


REPEATS = 5  # timed single products after a warm-up (1 with --quick)


def single_product_seconds(fn, device: str, repeats: int | None = None) -> float:
    return timeit(fn, REPEATS if repeats is None else repeats, device)


def wall(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------- hesslab
def run_hesslab(model, loss, data, device: str, sz: dict, budget) -> list[dict]:
    import hesslab as hl

    rows, ref = [], {}

    def op():
        H = hl.Hessian(model, loss, data, progress=False)
        return H, TimedProducts(H, device)

    H, _ = op()
    v = torch.randn(H.shape[0], 1, dtype=H.dtype, device=H.device)
    t1 = single_product_seconds(lambda: H.matmat(v), device)
    rows.append({"task": "product", "seconds": t1, "products": 1, "outside_products_share": 0.0})

    def task(name, fn):
        if budget.spent():
            rows.append({"task": name, "skipped": "time budget"})
            return
        H, timer = op()
        out, seconds = wall(lambda: fn(H), device)
        row = {"task": name, "seconds": seconds, "products": timer.columns, "product_seconds": timer.seconds,
               "outside_products_share": max(0.0, 1.0 - timer.seconds / seconds)}
        row.update(out)
        rows.append(row)

    def top(H):
        kw = {"k": sz["k"]} if sz["top_steps"] is None else {"k": sz["k"], "max_steps": sz["top_steps"]}
        r = hl.lanczos(H, which="LA", tol=1e-6, compute_residuals=True, progress=False, **kw)
        lam = r.eigenvalues.detach().cpu().double().numpy()
        res = r.residuals.detach().cpu().double().numpy()
        ref["top"] = lam
        return {"eigenvalues": lam.tolist(), "accuracy": float(np.nanmax(res / np.maximum(np.abs(lam), 1e-30))),
                "accuracy_kind": "max relative residual"}

    def slq(H):
        d = hl.spectral_density(H, num_steps=sz["slq_steps"], num_probes=sz["probes"], seed=0, progress=False)
        valid = d.valid()
        nodes = np.where(valid, d.nodes, np.nan)
        ref["slq"] = (nodes, np.where(valid, d.weights, 0.0))
        return {"accuracy": None, "accuracy_kind": "reference"}

    def trace(H):
        t = hl.trace(H, num_matvecs=sz["trace"], method="hutchinson", seed=0, progress=False)
        ref["trace"] = float(t.value)
        return {"value": float(t.value), "accuracy": float(t.std_error / max(abs(t.value), 1e-30)),
                "accuracy_kind": "relative standard error"}

    task("top10", top)
    task("slq", slq)
    task("trace", trace)
    if isinstance(loss, nn.CrossEntropyLoss):  # the ResNet: where curvlinops measured compilation
        rows.append(compiled_product_row(model, loss, data, device, budget))
    return rows, ref


def compiled_product_row(model, loss, data, device: str, budget) -> dict:
    """hesslab's compiled single product against the eager kept graph (bench_compiled.measure)."""
    if budget.spent():
        return {"task": "compiled product", "skipped": "time budget"}
    from bench_compiled import measure

    backend = "inductor" if device.startswith("cuda") else "aot_eager"  # CPU: the smoke test's path check
    try:
        r = measure(model, data, "Hessian", device, 1 if REPEATS == 1 else 5, backend, loss=loss)
    except Exception as exc:  # a failed compile is a result
        return {"task": "compiled product", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"task": "compiled product", "seconds": r["compiled_ms"] / 1e3, "products": 1, "outside_products_share": 0.0,
            "eager_seconds": r["eager_ms"] / 1e3, "compiled_vs_eager": r["ratio"], "compile_seconds": r["compile_s"],
            "break_even_products": r["break_even"], "accuracy": r["rel_diff"],
            "accuracy_kind": "relative difference to eager", "fallback": r["fallback"], "backend": backend}


# ---------------------------------------------------------------------------- peers
def _measure(nodes, weights):
    nodes, weights = np.asarray(nodes, dtype=np.float64).ravel(), np.asarray(weights, dtype=np.float64).ravel()
    keep = np.isfinite(nodes) & np.isfinite(weights) & (weights > 0)
    nodes, weights = nodes[keep], weights[keep]
    return nodes, weights / max(weights.sum(), 1e-300)


def wasserstein1(a, b) -> float:
    (xa, wa), (xb, wb) = _measure(*a), _measure(*b)
    if xa.size == 0 or xb.size == 0:
        return float("nan")
    grid = np.sort(np.concatenate([xa, xb]))
    ca = np.array([wa[xa <= g].sum() for g in grid])
    cb = np.array([wb[xb <= g].sum() for g in grid])
    return float(np.sum(np.abs(ca - cb)[:-1] * np.diff(grid)))


def run_peer(tool: str, model, loss, data, device: str, sz: dict, ref: dict, budget) -> list[dict]:
    import _peers_adapters

    adapter = _peers_adapters.ADAPTERS[tool](model, loss, data, device)
    rows = [{"task": "product", "seconds": single_product_seconds(adapter.hvp_fn(), device), "products": 1,
             "outside_products_share": 0.0}]
    t1 = rows[0]["seconds"]
    top_steps = sz["top_steps"]
    calls = {
        "top10": lambda: adapter.top_k(sz["k"], top_steps, top_steps is not None),
        "slq": lambda: adapter.slq(sz["slq_steps"], sz["probes"], False),
        "trace": lambda: adapter.trace(sz["trace"]),
    }
    for name, call in calls.items():
        if budget.spent():
            rows.append({"task": name, "skipped": "time budget"})
            continue
        out, seconds = wall(call, device)
        row = {"task": name, "seconds": seconds, "products": out.get("products"),
               "outside_products_share": max(0.0, 1.0 - (out.get("products") or 0) * t1 / seconds),
               "accuracy_kind": "vs hesslab"}
        if name == "top10" and "top" in ref:
            lam = np.sort(np.asarray(out["eigenvalues"], dtype=np.float64))[::-1]
            r = ref["top"][: len(lam)]
            row["accuracy"] = float(np.max(np.abs(lam[: len(r)] - r) / np.maximum(np.abs(r), 1e-30)))
        elif name == "slq" and "slq" in ref:
            nodes = ref["slq"][0]
            width = float(np.nanmax(nodes) - np.nanmin(nodes)) or 1.0
            row["accuracy"] = wasserstein1((out["nodes"], out["weights"]), ref["slq"]) / width
        elif name == "trace" and "trace" in ref:
            row["accuracy"] = abs(out["value"] - ref["trace"]) / max(abs(ref["trace"]), 1e-30)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- main
class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def spent(self) -> bool:
        return time.perf_counter() > self.deadline


def available(tools: list[str]) -> tuple[list[str], dict[str, str]]:
    ok, missing = [], {}
    for t in tools:
        if t == "hesslab":
            ok.append(t)
        elif t not in PEERS:
            raise SystemExit(f"unknown tool {t!r}; expected hesslab or one of {sorted(PEERS)}")
        elif importlib.util.find_spec(PEERS[t]) is None:
            missing[t] = "not installed"
        else:
            ok.append(t)
    return ok, missing


def render(rows: list[dict], env: dict, missing: dict) -> str:
    shown = [dict(r, share=None if r.get("outside_products_share") is None else 100 * r["outside_products_share"],
                  seconds=r.get("seconds"), status=r.get("skipped") or r.get("error") or "ok") for r in rows]
    text = table(shown, [("model", "model", "s"), ("library", "library", "s"), ("task", "task", "s"),
                         ("seconds", "seconds", ".3f"), ("products", "products", "d"),
                         ("share", "outside products %", ".1f"), ("accuracy", "accuracy", ".2e"),
                         ("accuracy_kind", "accuracy is", "s"), ("status", "status", "s")])
    head = f"GPU end to end on {env.get('gpu') or env.get('cpu')} (torch {env['torch']}, CUDA {env['cuda']})"
    notes = "".join(f"\n- {t}: skipped ({why})" for t, why in missing.items())
    return f"{head}\n\n{text}\n{notes}\n"


def main() -> None:
    global REPEATS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and tasks (seconds on a CPU)")
    # cuda by default even without a GPU (then nothing runs): `hesslab bench` on a CPU must not
    # start ResNet-18 at batch 512 there; --device cpu --quick is the smoke test
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="resnet18,gpt2")
    p.add_argument("--tools", default="hesslab," + ",".join(PEERS))
    p.add_argument("--resnet-batch", type=int, default=512)
    p.add_argument("--gpt2-batch", type=int, default=16)
    p.add_argument("--gpt2-seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed single products after a warm-up "
                   "(median reported; `hesslab bench` passes 3)")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="tasks starting after this are skipped")
    p.add_argument("--json", type=Path, default=OUT / "gpu_e2e.json")
    p.add_argument("--markdown", type=Path, default=None, help="default: the JSON path with .md")
    args = p.parse_args()
    REPEATS = 1 if args.quick else max(1, args.repeats)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu_e2e: no CUDA device; nothing to do (run with --device cpu --quick for a smoke test)")
        return
    tools, missing = available([t for t in args.tools.split(",") if t])
    env = environment(args.device)
    budget = Budget(args.max_seconds)
    sz = sizes(args)
    rows: list[dict] = []
    for name in [m for m in args.models.split(",") if m]:
        model, loss, data = build(name, args, args.device)
        n = sum(q.numel() for q in model.parameters())
        print(f"== {name}: {n:,} parameters, batch {data[0].shape[0]}, {args.device}", flush=True)
        ref: dict = {}
        for tool in tools:
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                if tool == "hesslab":
                    got, ref = run_hesslab(model, loss, data, args.device, sz, budget)
                else:
                    got = run_peer(tool, model, loss, data, args.device, sz, ref, budget)
            except Exception as exc:  # a peer failing on a workload is a result, not a crash
                if tool == "hesslab":
                    raise
                traceback.print_exc()
                got = [{"task": "all", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}]
            for r in got:
                r.update(model=name, library=tool, parameters=n)
                if args.device.startswith("cuda"):
                    r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                print("  " + json.dumps({k: v for k, v in r.items() if k != "eigenvalues"}), flush=True)
            rows += got
        del model, data
    md = render(rows, env, missing)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "settings": {**vars(args), "json": str(args.json), "markdown": None, **sz},
               "missing": missing, "rows": rows}
    args.json.write_text(json.dumps(payload, indent=1, default=lambda o: None if isinstance(o, float) and
                                    not math.isfinite(o) else str(o)))
    (args.markdown or args.json.with_suffix(".md")).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
