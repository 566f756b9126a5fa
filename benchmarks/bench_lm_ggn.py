"""Large-vocabulary LM losses: peak memory and time of one GGN product against a gradient.

Workload: a GPT-2-shaped transformers model built from a config (no download): 2 layers,
n_embd 64, 2 heads, a 50,257-token vocabulary (GPT-2's), tied lm_head; one batch of
2 × 32 tokens with ``labels = input_ids`` and ``loss_fn=None`` (the causal-LM token
cross-entropy over 62 predicted tokens); float32, CPU.

Measured, each in a fresh subprocess (so that one measurement's allocations cannot hide
another's), with the resident set size sampled every millisecond during the call:

  * gradient: ``Hessian(...).gradient()``, one forward and one backward pass;
  * ggn_default (after): ``GGN(model, None, batch) @ v``, the output-space curvature
    applied as p∘u − p(pᵀu) per token, on the path the rule picks for it (torch.func:
    forward-mode J V, one vjp);
  * ggn_closed_form_autograd: the same closed form on the autograd path (J V by
    differentiating Jᵀu, ``method="autograd"``);
  * ggn_double_backward (before): ``method="autograd", output_curvature="autograd"``, the
    loss Hessian by double backward through log-softmax, as before issue 13.

Peak memory is the largest RSS during the call minus the RSS just before it (glibc told
to return freed blocks above 64 KiB to the OS at once, so that RSS follows the live
tensors); time is the
median of the repeats after one warm-up (operators built with the first-order graph NOT
kept, so every product includes its forward pass).

    python benchmarks/bench_lm_ggn.py [--repeats 3] [--vocab 50257]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import environment, parser, table, write_json  # noqa: E402

CASES = ("gradient", "ggn_default", "ggn_closed_form_autograd", "ggn_double_backward")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _measure(case: str, vocab: int, repeats: int, threads: int) -> dict:
    """One case in this process: peak RSS increase (bytes) and median time (s)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from hesslab.linops import GGN, Hessian

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=vocab, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, vocab, (2, 32))
    batch = {"input_ids": ids, "labels": ids}
    opts = dict(check_deterministic=False, check_derivatives=False, reuse_graph=False)
    if case == "gradient":
        op = Hessian(model, None, batch, **opts)
        call = op.gradient
    else:
        curv = "autograd" if case == "ggn_double_backward" else "auto"
        if case != "ggn_default":
            opts.update(method="autograd")
        op = GGN(model, None, batch, output_curvature=curv, **opts)
        v = torch.randn(op.shape[0])
        call = lambda: op @ v  # noqa: E731
    call()  # warm-up
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    base = _rss()
    peak[0] = base
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    stop.set()
    t.join()
    times = [first]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"case": case, "peak_mib": (peak[0] - base) / 2**20, "time_s": statistics.median(times),
            "n": op.shape[0]}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--case", default=None, help=argparse_hidden())
    args = p.parse_args()
    threads = int(str(args.threads).split(",")[0])
    repeats = max(1, min(args.repeats, 3))
    if args.case:
        print(json.dumps(_measure(args.case, args.vocab, repeats, threads)))
        return
    rows = []
    for case in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--case", case, "--vocab", str(args.vocab),
             "--repeats", str(repeats), "--threads", str(threads)],
            capture_output=True, text=True, check=True, cwd=ROOT, env=_malloc_env(),
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    grad = rows[0]["peak_mib"]
    for r in rows:
        r["vs_gradient"] = r["peak_mib"] / grad if grad > 0 else float("nan")
    print(table(rows, [("case", "case", "s"), ("peak_mib", "peak MiB", ".1f"),
                       ("vs_gradient", "× gradient", ".2f"), ("time_s", "time s", ".3f")]))
    path = write_json("lm_ggn", {"env": environment("cpu"), "vocab": args.vocab, "threads": threads,
                                 "batch": [2, 32], "rows": rows}, args.out)
    print(f"wrote {path}")


def _malloc_env() -> dict:
    """glibc returns every allocation above 64 KiB to the OS on free (mmap), so RSS tracks
    the live tensors instead of a heap that keeps the warm-up's freed blocks."""
    import os

    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
