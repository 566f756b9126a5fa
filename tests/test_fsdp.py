"""FSDP2-sharded models (``fully_shard``): the sharded Hessian against the unsharded model's.

Gloo on 127.0.0.1, every collective with a 60 s timeout, 2 and 4 ranks. Uneven data
shards: 23 samples as 9 + 14 or 3 + 8 + 5 + 7, odd ranks iterating a DataLoader of
batches of 5 (so the ranks run different numbers of batches). Uneven parameter shards:
row counts that the world size does not divide, some shards empty. Two float64 models:
a tanh MLP 5 -> 7 -> 6 -> 3 (111 parameters; with 4 ranks the 6-row and 3-row layers
leave rank 3 empty) and a one-layer GPT-2 (transformers; n_embd 10, vocabulary 18,
7 positions: 1.6k parameters) with its own causal-LM loss (``loss_fn=None``, dict
batches, ranks holding different numbers of predicted tokens).

The sharded products, gathered with ``shards.gather``, equal the dense Hessian of the
unsharded model over all of the data (torch.func, float64, one process) times the
gathered vectors within the documented finite-difference bound (the K of
tests/test_finite_difference.py); the gradient and the loss equal the exact ones; what
every rank gathers is bitwise the same; the parameters are bitwise restored after many
products, the user's ``.grad`` is kept, and BatchNorm statistics stay put in train mode.
Bad input raises the same HesslabError on every rank.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from hesslab.errors import HesslabError
from hesslab.linops import GGN, KFAC, Hessian
from hesslab.linops._sharded import block_indices
from tests.models import classification_data, fully_shard_model, mlp, tiny_gpt2, token_batch
from tests.test_distributed import _free_port, gloo_group
from tests.test_finite_difference import K

CE = nn.CrossEntropyLoss()
SIZES = {2: (9, 14), 4: (3, 8, 5, 7)}  # samples per rank, 23 in all
MLP = {"in_features": 5, "hidden": (7, 6), "out_features": 3}
GPT = {"n_embd": 10, "vocab": 18, "n_positions": 7}
BOUND = K * torch.finfo(torch.float64).eps ** (2 / 3)  # relative error of a float64 FD product
BLOCK = ("4.bias", "0.weight")  # a selection: the block of these, in named_parameters order
NUM_PRODUCTS = 20  # products after which the parameters must be bitwise as before


# ------------------------------------------------------------------ data and references
def _block(n: int, b: int = 3) -> torch.Tensor:
    return torch.randn(n, b, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _mlp_batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s batches: its slice of the 23 samples, in batches of 5 on odd ranks."""
    X, y = classification_data(23, MLP["in_features"])
    start = sum(SIZES[world][:rank])
    Xs, ys = X[start: start + SIZES[world][rank]], y[start: start + SIZES[world][rank]]
    step = 5 if rank % 2 else len(ys)
    return [(Xs[i: i + step], ys[i: i + step]) for i in range(0, len(ys), step)]


def _mlp_shard(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s samples as one batch."""
    Xs, ys = (torch.cat(t) for t in zip(*_mlp_batches(rank, world)))
    return Xs, ys


def _mlp_data(rank: int, world: int):
    Xs, ys = _mlp_shard(rank, world)
    return DataLoader(TensorDataset(Xs, ys), batch_size=5) if rank % 2 else (Xs, ys)


def _gpt_batches(rank: int) -> list[dict]:
    """1-3 sequences of 7 tokens per batch, some labels ignored; two batches on odd ranks."""
    return [
        token_batch(1 + rank % 3, 7, vocab=GPT["vocab"], seed=10 * rank + i, ignore=rank + i)
        for i in range(1 + rank % 2)
    ]


def _flat_loss(model: nn.Module, loss_of):
    """(θ, f) with f(θ) = loss_of(call), ``call`` the model at the flat parameters θ."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        tensors = {k: p.reshape(s) for k, p, s in zip(names, parts, shapes)}
        return loss_of(lambda *a, **kw: functional_call(model, tensors, a, kw))

    return theta, f


def _mlp_reference(world: int) -> dict[str, torch.Tensor]:
    """Dense H, ∇L and L of the unsharded MLP over all 23 samples (torch.func, float64)."""
    X, y = classification_data(23, MLP["in_features"])
    theta, f = _flat_loss(mlp(**MLP), lambda call: CE(call(X), y))
    return {"H": torch.func.hessian(f)(theta), "grad": torch.func.grad(f)(theta), "loss": f(theta)}


def _gpt_reference(world: int, V: torch.Tensor) -> torch.Tensor:
    """H V of the unsharded GPT-2: the mean token cross-entropy over every rank's batches.

    The cross-entropy of the shifted logits in float64 (transformers' own ``.loss`` casts
    the logits to float32), summed over predicted tokens and divided by their number.
    """
    model = tiny_gpt2(attn="eager", **GPT)  # forward-mode AD has no rule for fused SDPA
    batches = [b for r in range(world) for b in _gpt_batches(r)]
    count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    def loss_of(call):
        terms = [
            F.cross_entropy(call(input_ids=b["input_ids"]).logits[:, :-1].flatten(0, 1),
                            b["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum")
            for b in batches
        ]
        return sum(terms) / count

    theta, f = _flat_loss(model, loss_of)
    grad = torch.func.grad(f)
    return torch.stack([torch.func.jvp(grad, (theta,), (v,))[1] for v in V.T], dim=1)


# ------------------------------------------------------------------ what the ranks run
def _local(H: Hessian, V: torch.Tensor) -> torch.Tensor:
    """This rank's part of the global block V (n, b): the entries its layout maps to."""
    return V[H.shards.index()]


def _products(H: Hessian) -> dict[str, object]:
    """Products, gradient and loss of a sharded H, gathered on every rank in turn."""
    sh = H.shards
    V = _block(sh.global_size)
    Vl = _local(H, V)

    def everywhere(t: torch.Tensor) -> torch.Tensor:
        return [sh.gather(t, dst=r) for r in range(sh.world)][sh.rank]

    return {
        "shape": H.shape, "sizes": sh.local_sizes, "names": H.param_names, "path": H.hvp_path,
        "param_shapes": [tuple(s) for s in H.param_shapes],
        "num_data": H.num_data, "V": everywhere(Vl), "HV": everywhere(H @ Vl),
        "Hv": everywhere(H @ Vl[:, 0]), "grad": everywhere(H.gradient()), "loss": H.loss(),
    }


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _shards_of(model: nn.Module, grads: bool = False) -> list[torch.Tensor]:
    """Copies of the local shards of every parameter (or of its .grad), the model resharded."""
    for m in _fsdp_modules(model):
        m.reshard()
    return [(p.grad if grads else p).to_local().detach().clone() for p in model.parameters()]


def _sharded_mlp(**kwargs) -> nn.Module:
    """The MLP with its first layer and the root sharded (two FSDP groups: few collectives)."""
    model = mlp(**MLP, **kwargs)
    return fully_shard_model(model, blocks=[model[0]])


def _mlp_job(rank: int, world: int) -> dict[str, object]:
    model = _sharded_mlp()
    data = _mlp_data(rank, world)
    X, y = _mlp_batches(rank, world)[0]
    CE(model(X), y).backward()  # the user's own gradients, which hesslab must leave alone
    params, grads = _shards_of(model), _shards_of(model, grads=True)
    H = Hessian(model, CE, data)
    out = _products(H)
    if world == 2:
        v = _local(H, _block(H.shards.global_size, 1))
        for _ in range(NUM_PRODUCTS):
            H @ v
        block = Hessian(model, CE, data, params=list(BLOCK))
        out["block_HV"] = block.shards.gather(block @ _local(block, _block(block.shards.global_size)))
        out["block_names"] = block.param_names
        bn = _sharded_mlp(batchnorm=True)
        buffers = [b.clone() for b in bn.buffers()]
        Hb = Hessian(bn, CE, _mlp_shard(rank, world), train_mode=True)  # no 2-sample batches
        out["bn_HV"] = Hb.shards.gather(Hb @ _local(Hb, _block(Hb.shards.global_size)))
        out["bn_kept"] = all(torch.equal(a, b) for a, b in zip(buffers, bn.buffers()))
        out["bn_eval"] = not any(m.training for m in bn.modules())
    out["params_kept"] = all(torch.equal(a, b) for a, b in zip(params, _shards_of(model)))
    out["grads_kept"] = all(torch.equal(a, b) for a, b in zip(grads, _shards_of(model, grads=True)))
    return out


def _gpt_job(rank: int, world: int) -> dict[str, object]:
    """With 2 ranks the model keeps its parameters unsharded after forward and backward."""
    model = tiny_gpt2(**GPT)
    fully_shard_model(model, blocks=list(model.transformer.h), reshard_after_forward=world != 2)
    model.set_reshard_after_backward(world != 2)
    batches = _gpt_batches(rank)
    return _products(Hessian(model, None, batches[0] if len(batches) == 1 else batches))


def _errors_job(rank: int, world: int) -> dict[str, str | None]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    X, y = classification_data(23, MLP["in_features"])
    data = (X[:9], y[:9]) if rank == 0 else (X[9:], y[9:])
    model = fully_shard_model(mlp(**MLP))
    partly = mlp(**MLP)
    fully_shard(partly[0])  # the other layers' parameters stay plain tensors
    low = fully_shard_model(mlp(**MLP), mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    cases = {
        "selection": lambda: Hessian(model, CE, data, params=None if rank == 0 else "0.*"),
        "no_data": lambda: Hessian(model, CE, data if rank == 0 else (X[:0], y[:0])),
        "mixed": lambda: Hessian(partly, CE, data),
        "method": lambda: Hessian(model, CE, data, method="autograd"),
        "ggn": lambda: GGN(model, CE, data),
        "kfac": lambda: KFAC(model, CE, data),
        "dtype": lambda: Hessian(model, CE, data, dtype=torch.float32),
        "precision": lambda: Hessian(low, CE, data),
        "nan": lambda: H @ torch.full((H.shape[0],), math.nan if rank == 1 else 1.0),
    }
    H = Hessian(model, CE, data)
    out: dict[str, str | None] = {}
    for name, make in cases.items():
        try:
            make()
            out[name] = None
        except HesslabError as err:
            out[name] = str(err)
    out["loss_after"] = H.loss()  # the ranks are still in step
    return out


def _solvers_job(rank: int, world: int) -> dict[str, object]:
    """lanczos, trace and (2 ranks) spectral_density on the sharded MLP's Hessian."""
    import hesslab as hl

    H = Hessian(_sharded_mlp(), CE, _mlp_data(rank, world))
    top = hl.lanczos(H, k=3, seed=1)
    out = {"eigenvalues": top.eigenvalues, "converged": top.converged,
           "vectors": hl.gather_shards(H, top.eigenvectors, dst=0),
           "trace": hl.trace(H, num_matvecs=40 if world == 2 else 20, method="hutchinson", seed=2)}
    if world == 2:
        out["density"] = hl.spectral_density(H, num_steps=12, num_probes=6, seed=3)
    return out


JOBS = {"mlp": _mlp_job, "gpt": _gpt_job, "errors": _errors_job, "solvers": _solvers_job,
        "both": lambda r, w: {"mlp": _mlp_job(r, w), "gpt": _gpt_job(r, w)}}


def _worker(rank: int, job: str, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port):
        torch.save(JOBS[job](rank, world), Path(out_dir) / f"rank{rank}.pt")


def _run(job: str, world: int, tmp_path: Path) -> list[dict]:
    assert not dist.is_initialized()
    mp.spawn(_worker, args=(job, world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ------------------------------------------------------------------ checks
def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest relative error over the columns."""
    got, want = got.reshape(want.shape[0], -1), want.reshape(want.shape[0], -1)
    return float(((got - want).norm(dim=0) / want.norm(dim=0)).max())


def _check_same_on_every_rank(outs: list[dict]) -> dict:
    """What every rank gathered and computed is bitwise the same; returns rank 0's."""
    first = outs[0]
    for out in outs[1:]:
        for key in ("HV", "Hv", "V", "grad"):
            assert torch.equal(out[key], first[key]), key
        for key in ("sizes", "names", "num_data", "loss"):  # the loss: summed in rank order
            assert out[key] == first[key], key
    for rank, out in enumerate(outs):
        assert out["path"] == "finite_difference"
        assert out["shape"] == (out["sizes"][rank],) * 2
    return first


def _check_mlp(outs: list[dict]) -> None:
    world = len(outs)
    got = _check_same_on_every_rank(outs)
    ref = _mlp_reference(world)
    n = ref["H"].shape[0]
    V = _block(n)
    assert got["names"] == [k for k, _ in mlp(**MLP).named_parameters()]
    assert sum(got["sizes"]) == n and got["num_data"] == 23
    if world == 4:  # rank 3's shards of the 6-row and 3-row layers are empty
        assert [s[0] for s in outs[3]["param_shapes"]] == [1, 1, 0, 0, 0, 0]
    assert torch.equal(got["V"], V)  # the layout puts every entry back where it belongs
    assert _rel(got["HV"], ref["H"] @ V) <= BOUND
    assert _rel(got["Hv"], ref["H"] @ V[:, 0]) <= BOUND
    assert torch.allclose(got["grad"], ref["grad"], rtol=0, atol=1e-13 * ref["grad"].abs().max())
    assert abs(got["loss"] - float(ref["loss"])) <= 1e-14
    for out in outs:
        assert out["params_kept"] and out["grads_kept"]
    if world == 2:
        names = [k for k, _ in mlp(**MLP).named_parameters()]
        sizes = [p.numel() for p in mlp(**MLP).parameters()]
        ends = torch.tensor(sizes).cumsum(0).tolist()
        idx = torch.cat([torch.arange(e - s, e) for k, s, e in zip(names, sizes, ends) if k in BLOCK])
        sub = ref["H"][idx][:, idx]
        assert outs[0]["block_names"] == ["0.weight", "4.bias"]
        assert _rel(outs[0]["block_HV"], sub @ _block(len(idx))) <= BOUND
        bn = mlp(**MLP, batchnorm=True)
        batches = [_mlp_shard(r, world) for r in range(world)]  # BatchNorm: per rank's batch
        exact = Hessian(bn, CE, batches, train_mode=True) @ _block(got["bn_HV"].shape[0])
        assert _rel(got["bn_HV"], exact) <= BOUND
        assert all(out["bn_kept"] and out["bn_eval"] for out in outs)


def _check_gpt(outs: list[dict]) -> None:
    got = _check_same_on_every_rank(outs)
    model = tiny_gpt2(**GPT)
    n = sum(p.numel() for p in model.parameters())
    assert got["names"] == [k for k, _ in model.named_parameters()] and sum(got["sizes"]) == n
    V = _block(n)
    assert torch.equal(got["V"], V)
    assert _rel(got["HV"], _gpt_reference(len(outs), V)) <= BOUND
    batches = [b for r in range(len(outs)) for b in _gpt_batches(r)]
    assert got["num_data"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def test_two_ranks_mlp_and_gpt2_match_the_unsharded_hessian(tmp_path):
    outs = _run("both", 2, tmp_path)
    _check_mlp([o["mlp"] for o in outs])
    _check_gpt([o["gpt"] for o in outs])


def test_four_ranks_with_empty_shards_match_the_unsharded_hessian(tmp_path):
    outs = _run("both", 4, tmp_path)
    _check_mlp([o["mlp"] for o in outs])
    _check_gpt([o["gpt"] for o in outs])


@pytest.mark.parametrize("world", [2, 4])
def test_solvers_on_the_sharded_hessian_match_the_dense_unsharded_one(world, tmp_path):
    """Top-k eigenpairs, the trace and SLQ moments of the sharded MLP against numpy's eigh of
    the dense float64 Hessian of the unsharded model over all the data (one process)."""
    outs = _run("solvers", world, tmp_path)
    H = _mlp_reference(world)["H"].numpy()
    lam, U = np.linalg.eigh(H)
    scale = np.abs(lam).max()
    first = outs[0]
    for out in outs[1:]:  # the same all-reduced scalars on every rank: bitwise equal results
        assert np.array_equal(out["eigenvalues"], first["eigenvalues"])
        assert out["trace"].value == first["trace"].value
        if "density" in first:
            assert np.array_equal(out["density"].nodes, first["density"].nodes)
        assert out["vectors"] is None  # gathered on rank 0 only
    assert first["converged"].all()
    np.testing.assert_allclose(first["eigenvalues"], lam[::-1][:3], rtol=0, atol=100 * BOUND * scale)
    overlap = np.abs(U[:, ::-1][:, :3].T @ first["vectors"].numpy())  # up to sign; the top 3 are simple
    np.testing.assert_allclose(np.diag(overlap), 1.0, atol=1e-6)
    tr = first["trace"]
    assert abs(tr.value - np.trace(H)) <= 5 * tr.std_error
    if "density" in first:
        d = first["density"]
        for p in (1, 2):  # per probe Σ w θ^p estimates tr(H^p)/n
            per_probe = (d.weights * d.nodes ** p).sum(axis=1)
            exact = np.trace(np.linalg.matrix_power(H, p)) / H.shape[0]
            assert abs(per_probe.mean() - exact) <= 5 * per_probe.std(ddof=1) / np.sqrt(len(per_probe)) + 1e-9 * scale ** p


def test_bad_input_gives_the_same_error_on_every_rank(tmp_path):
    outs = _run("errors", 2, tmp_path)
    expected = {
        "selection": "params: the ranks select different parameters",
        "no_data": "data: rank(s) [1] of 2 cannot use their first batch",
        "mixed": "params: selects FSDP2-sharded (DTensor) parameters and plain ones",
        "method": "method: 'autograd' needs second derivatives through autograd",
        "ggn": "model: GGN of an FSDP2-sharded model",
        "kfac": "model: KFAC of an FSDP2-sharded model",
        "dtype": "dtype: torch.float32 differs from the sharded parameters' dtype torch.float64",
        "precision": "model: its FSDP2 MixedPrecisionPolicy has param_dtype=torch.float32",
        "nan": "V: the block of vectors holds NaN or Inf entries",
    }
    for name, prefix in expected.items():
        # the empty shard's message adds its own cause on that rank (ModelData.first_batch)
        messages = {out[name] if name != "no_data" else out[name][: len(prefix)] for out in outs}
        assert len(messages) == 1, (name, messages)
        (message,) = messages
        assert message is not None and message.startswith(prefix), (name, message)
    assert outs[0]["loss_after"] == outs[1]["loss_after"]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_block_indices_are_the_blocks_entries_in_the_flat_tensor(data):
    shape = data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=3), label="shape")
    start = [data.draw(st.integers(0, s)) for s in shape]
    block = [data.draw(st.integers(0, s - o)) for s, o in zip(shape, start)]
    flat = torch.arange(math.prod(shape)).reshape(shape)
    want = flat[tuple(slice(o, o + b) for o, b in zip(start, block))].reshape(-1)
    assert torch.equal(block_indices(shape, block, start), want)
