"""Data-parallel operators (Hessian, GGN, KFAC): two gloo processes on the CPU against one process over all the data.

Each rank holds an uneven shard (7 and 13 of 20 samples; one rank a single batch, the
other a DataLoader with an uneven last batch). Products, gradient, loss and the number
of samples must equal those of a single process over all of the data: the operators
all-reduce with each rank weighted by its number of samples.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import warnings

from hesslab.errors import HesslabError
from hesslab.linops import GGN, KFAC, Hessian
from hesslab.linops._model import collective_device, global_count
from tests.models import classification_data, mlp

WORLD = 2
SHARDS = [slice(0, 7), slice(7, 20)]
CE = nn.CrossEntropyLoss()


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """This process as ``rank`` of a gloo group on 127.0.0.1 (one thread, a 60 s timeout on
    every collective, so a test cannot hang), destroyed on exit."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    model = mlp(batchnorm=True, hidden=(6, 5))
    X, y = classification_data(20)
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(n, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return model, X, y, V


def _results(model: nn.Module, data, V: torch.Tensor) -> dict[str, object]:
    H = Hessian(model, CE, data)
    G = GGN(model, CE, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the BatchNorm layers are skipped
        K = KFAC(model, CE, data)
    return {
        "KV": K @ V[: K.shape[0]],
        "K_num_data": K.num_data,
        "HV": H @ V,
        "Hv": H @ V[:, 0],
        "GV": G @ V,
        "grad": H.gradient(),
        "loss": H.loss(),
        "num_data": H.num_data,
        "block": Hessian(model, CE, data, params="0.*") @ V[:30, :2],  # "0.weight", "0.bias": 30
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, WORLD, port):
        assert collective_device() == torch.device("cpu")  # the one rule: gloo on the CPU
        assert global_count(rank + 1) == 3
        model, X, y, V = _setup()
        Xs, ys = X[SHARDS[rank]], y[SHARDS[rank]]
        if rank == 0:
            data = (Xs, ys)  # one batch in memory: the kept-graph path
        else:
            data = DataLoader(TensorDataset(Xs, ys), batch_size=5)  # 5 + 5 + 3
        torch.save(_results(model, data, V), Path(out_dir) / f"rank{rank}.pt")


def _empty_shard_worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, WORLD, port):
        model, X, y, _ = _setup()
        data = (X[:0], y[:0]) if rank == 1 else (X[:7], y[:7])  # rank 1 holds no sample
        errors = []
        for make in (lambda: Hessian(model, CE, data), lambda: KFAC(model, CE, data)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    make()
                errors.append(None)
            except HesslabError as err:
                errors.append(str(err))
        (Path(out_dir) / f"rank{rank}.txt").write_text(repr(errors))


def test_a_rank_with_an_empty_shard_makes_every_rank_raise_the_same_error(tmp_path):
    mp.spawn(_empty_shard_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        errors = eval((tmp_path / f"rank{rank}.txt").read_text())
        assert all(e is not None and e.startswith("data: rank(s) [1] of 2 cannot use their first batch")
                   for e in errors), (rank, errors)


def test_two_gloo_processes_match_one_process(tmp_path):
    assert not dist.is_initialized()
    model, X, y, V = _setup()
    expected = _results(model, (X, y), V)
    assert expected["num_data"] == 20
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["num_data"] == 20 and got["K_num_data"] == 20
        assert abs(got["loss"] - expected["loss"]) <= 1e-13 * abs(expected["loss"])
        for key in ("HV", "Hv", "GV", "grad", "block", "KV"):
            scale = expected[key].abs().max()
            err = (got[key] - expected[key]).abs().max()
            assert err <= 1e-12 * scale, (rank, key, float(err), float(scale))
