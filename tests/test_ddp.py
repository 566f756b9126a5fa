"""DistributedDataParallel-wrapped models, and finite-difference products across ranks.

Two gloo processes on 127.0.0.1 (uneven shards of 7 and 13 samples, every collective
with a 60 s timeout) against one process over all of the data, in float64: a
DDP-wrapped model, the same model unwrapped, and the single process give the same
Hessian products and the same ``hesslab.lanczos`` top-2 to 1e-10. ``autograd.grad``
never fires DDP's gradient hooks, so the operators all-reduce the products themselves.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import hesslab as hl
from hesslab.linops import Hessian
from tests.test_distributed import SHARDS, WORLD, _free_port, _setup, gloo_group

CE = nn.CrossEntropyLoss()
TOL = 1e-10


def _results(model: nn.Module, data, V: torch.Tensor) -> dict[str, object]:
    H = Hessian(model, CE, data)
    F = Hessian(model, CE, data, method="finite_difference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm has no Kronecker form: skipped, with a warning
        K = hl.KFAC(model, CE, data, dtype=torch.float64)
    return {
        "kfac_names": K.param_names,
        "KV": K @ V[: K.shape[0]],
        "names": H.param_names,
        "HV": H @ V,
        "FV": F @ V,
        "top2": torch.as_tensor(hl.lanczos(H, k=2, seed=0).eigenvalues),
        "num_data": H.num_data,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, WORLD, port):
        model, X, y, V = _setup()
        data = (X[SHARDS[rank]], y[SHARDS[rank]])
        wrapped = DDP(model)
        out = {"ddp": _results(wrapped, data, V), "plain": _results(model, data, V)}
        block = Hessian(wrapped, CE, data, params=["module.0.weight", "module.0.bias"])
        out["block_names"] = block.param_names
        out["block"] = block @ V[:30, :2]
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return bool((got - want).abs().max() <= tol * want.abs().max())


def test_ddp_wrapped_unwrapped_and_one_process_agree(tmp_path):
    assert not dist.is_initialized()
    model, X, y, V = _setup()
    expected = _results(model, (X, y), V)
    exact_block = Hessian(model, CE, (X, y), params="0.*") @ V[:30, :2]
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["block_names"] == ["0.weight", "0.bias"]
        assert _close(got["block"], exact_block, TOL)
        for kind in ("ddp", "plain"):
            r = got[kind]
            assert r["names"] == expected["names"]  # the inner module's, no "module."
            assert r["num_data"] == 20
            assert r["kfac_names"] == expected["kfac_names"]
            assert _close(r["KV"], expected["KV"], TOL), (rank, kind)
            assert _close(r["HV"], expected["HV"], TOL), (rank, kind)
            assert _close(r["top2"], expected["top2"], TOL), (rank, kind, r["top2"])
            # finite differences across ranks: the same quotient as one process, up to the
            # rounding of a gradient summed in another order over ε (~1e-16 / 6e-6)
            assert _close(r["FV"], expected["FV"], 1e-8), (rank, kind)
            assert _close(r["FV"], expected["HV"], 1e-7), (rank, kind)
