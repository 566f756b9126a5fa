"""Solver checkpoints: bad files are refused before step 1, a checkpoint knows its
operator, and a run killed at any point (SIGKILL, also during a write) resumes to the
bitwise-identical result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hesslab.errors import HesslabError
from hesslab.linops import DenseOperator
from hesslab.solvers import lanczos, spectral_density

ROOT = Path(__file__).resolve().parents[1]


def _matrix(seed: int, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([9.0, 7.0, 7.0, 5.0], dtype=torch.float64), torch.linspace(-1, 1, n - 4, dtype=torch.float64)])
    return (U * lam) @ U.T


RUNS = {
    "lanczos": lambda op, **kw: lanczos(op, k=4, **kw),
    "slq": lambda op, **kw: spectral_density(op, num_steps=20, num_probes=3, grid_size=50, **kw),
}


def _same(a, b) -> None:
    for key, value in a.to_dict().items():
        if key != "num_matvecs":
            np.testing.assert_array_equal(np.asarray(value), np.asarray(b.to_dict()[key]), err_msg=key)


@pytest.mark.parametrize("solver", sorted(RUNS))
def test_a_checkpoint_of_another_operator_is_refused(tmp_path, solver):
    run, path = RUNS[solver], tmp_path / "c.pt"
    first = run(DenseOperator(_matrix(0)), checkpoint=path)
    with pytest.raises(HesslabError, match="checkpoint.*different operator.*delete the file or pass another"):
        run(DenseOperator(_matrix(1)), checkpoint=path)  # same shape and dtype, other matrix
    with pytest.raises(HesslabError, match="checkpoint.*different operator"):
        run(DenseOperator(_matrix(0)) + DenseOperator(torch.zeros(40, 40, dtype=torch.float64)), checkpoint=path)
    op = DenseOperator(_matrix(0))
    again = run(op, checkpoint=path)  # a finished run of the same operator: one identity product
    _same(first, again)
    assert op.num_matvecs == 1  # lanczos finds its k residuals in the checkpoint (issue 12)


def test_bad_checkpoint_files_are_refused_before_any_product(tmp_path):
    op = DenseOperator(_matrix(0))
    good = tmp_path / "good.pt"
    lanczos(op, k=2, checkpoint=good)
    files = {
        "random": os.urandom(300),
        "truncated": good.read_bytes()[:200],
        "empty": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign")
    torch.save(torch.ones(3), tmp_path / "tensor")
    (tmp_path / "a_file").write_text("x")
    cases = [(tmp_path / n, "not a readable hesslab checkpoint") for n in files]
    cases += [(tmp_path / "foreign", "not a hesslab solver checkpoint"), (tmp_path / "tensor", "not a hesslab solver"),
              (tmp_path, "is a directory"), (tmp_path / "missing" / "c.pt", "does not exist"),
              (tmp_path / "a_file" / "c.pt", "does not exist")]
    for path, message in cases:
        for run in RUNS.values():
            op.num_matvecs = 0
            with pytest.raises(HesslabError, match=f"checkpoint.*{message}"):
                run(op, checkpoint=path)
            assert op.num_matvecs == 0, path


def test_an_unwritable_folder_is_refused_before_step_one(tmp_path, monkeypatch):
    op = DenseOperator(_matrix(0))
    real_open = open

    def refusing(file, mode="r", *args, **kwargs):  # as a read-only folder would (root ignores chmod)
        if "w" in mode and str(file).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing)
    with pytest.raises(HesslabError, match="checkpoint: cannot write in .*Permission denied"):
        lanczos(op, k=2, checkpoint=tmp_path / "c.pt")
    assert op.num_matvecs == 0


def test_checkpoint_every_must_be_positive(tmp_path):
    op = DenseOperator(_matrix(0))
    for bad in (0, -1, 2.5, True):
        for run in RUNS.values():
            with pytest.raises(HesslabError, match="checkpoint_every must be an integer >= 1"):
                run(op, checkpoint=tmp_path / "c.pt", checkpoint_every=bad)


class _Counted(DenseOperator):
    """Counts its product calls; raises KeyboardInterrupt on the call numbered ``fail_at``."""

    def __init__(self, A, fail_at=None):
        super().__init__(A)
        self.calls, self.fail_at = 0, fail_at

    def _matmat(self, V):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return super()._matmat(V)


def test_resuming_a_finished_lanczos_costs_one_product(tmp_path):
    """Issue 12: a finished checkpoint keeps the residual norms of its k Ritz pairs."""
    path, A = tmp_path / "c.pt", _matrix(0)
    first = lanczos(_Counted(A), k=4, checkpoint=path)
    op = _Counted(A)
    again = lanczos(op, k=4, checkpoint=path)
    assert op.calls == 1 and op.num_matvecs == 1
    _same(first, again)
    assert again.num_matvecs == first.num_matvecs and bool(again.converged.all())
    # a finished run that did not measure its residuals measures them on resume (one block product)
    lanczos(_Counted(A), k=4, checkpoint=tmp_path / "n.pt", compute_residuals=False)
    op = _Counted(A)
    _same(first, lanczos(op, k=4, checkpoint=tmp_path / "n.pt"))
    assert op.calls == 2 and op.num_matvecs == 1 + 4
    # interrupted while measuring them: the steps are kept, only the residuals are redone
    whole = _Counted(A)
    lanczos(whole, k=4)
    op = _Counted(A, fail_at=whole.calls)  # the residual product is the run's last call
    with pytest.raises(KeyboardInterrupt):
        lanczos(op, k=4, checkpoint=tmp_path / "i.pt")
    op = _Counted(A)
    _same(first, lanczos(op, k=4, checkpoint=tmp_path / "i.pt"))
    assert op.calls == 2


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from hesslab.linops import DenseOperator
    from hesslab.solvers import _checkpoint
    from tests.test_checkpoints import RUNS, _matrix
    solver, path, kill_at, in_write = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    torch.set_num_threads(1)

    class Dying(DenseOperator):
        def _matmat(self, V):
            if self.num_matvecs >= kill_at and not in_write:
                os.kill(os.getpid(), signal.SIGKILL)
            return super()._matmat(V)

    op = Dying(_matrix(0))
    if in_write:  # die half-way through the first checkpoint write after product kill_at
        real = torch.save
        def dying_save(obj, f):
            if op.num_matvecs >= kill_at:
                f.write(b"PK\\x03\\x04 half a file")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real(obj, f)
        _checkpoint.torch.save = dying_save
    RUNS[solver](op, checkpoint=path, checkpoint_every=1)
""")


def _child(solver: str, path: Path, kill_at: int, in_write: bool) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, solver, str(path), str(kill_at), str(int(in_write))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, -9), proc.stderr[-2000:]
    return proc.returncode


@pytest.mark.parametrize("solver", sorted(RUNS))
def test_sigkill_at_random_steps_resumes_bitwise(tmp_path, solver):
    torch.set_num_threads(1)
    whole = RUNS[solver](DenseOperator(_matrix(0)))
    rng = np.random.default_rng(7 if solver == "lanczos" else 8)
    path = tmp_path / "c.pt"
    # two kills at random products (one of them inside a checkpoint write), then finish here
    # (products before the kill, counted from each child's start; whether it hits a write)
    if solver == "lanczos":  # in a step, then in a write of the resumed run
        kills = [(int(rng.integers(3, whole.num_steps - 5)), False), (int(rng.integers(2, 4)), True)]
    else:  # 3 products per step
        kills = [(int(rng.integers(6, whole.num_matvecs - 3)), True)]
    for kill_at, in_write in kills:
        assert _child(solver, path, kill_at, in_write) == -9
        assert path.exists()  # the torn write went to a temporary file: the previous checkpoint stands
    assert torch.load(path, weights_only=True)["j"] >= 2  # work was kept
    resumed = RUNS[solver](DenseOperator(_matrix(0)), checkpoint=path)
    _same(whole, resumed)
    if solver == "lanczos":  # the second copy of 7 needs a restart
        np.testing.assert_allclose(resumed.eigenvalues.numpy(), [9, 7, 7, 5], atol=1e-10)
        assert resumed.restarts >= 1 and bool(resumed.converged.all())
