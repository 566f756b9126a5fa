"""Transformers and timm models built from configs (tiny, float64, nothing downloaded).

Oracles: torch.func Hessians of the EAGER-attention twin of each model (transformers
``attn_implementation="eager"``, timm ``fused_attn=False``), with the causal-LM loss
written out here by slicing (logits[:, :-1] against labels[:, 1:]).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hesslab.errors import HesslabError
from hesslab.linops import GGN, Hessian
from tests.models import tiny_gpt2, tiny_vit, token_batch

pytest.importorskip("transformers")
pytest.importorskip("timm")

CE = nn.CrossEntropyLoss()
RTOL = 1e-8


def assert_close(a: Tensor, b: Tensor, rtol: float = RTOL) -> None:
    scale = max(float(b.abs().max()), 1e-12)
    assert float((a - b).abs().max()) <= rtol * scale, float((a - b).abs().max()) / scale


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The mean over predicted tokens, by slicing (independent of hesslab's padding)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _flat_fn(model: nn.Module, names: list[str], loss_of):
    params = dict(model.named_parameters())
    fixed = {k: v.detach() for k, v in params.items()}
    shapes = [params[k].shape for k in names]
    flat0 = torch.cat([params[k].detach().reshape(-1) for k in names])

    def f(flat: Tensor) -> Tensor:
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        p = {k: t.reshape(s) for k, t, s in zip(names, parts, shapes)}
        return loss_of(lambda *a, **k: functional_call(model, {**fixed, **p}, a, k))

    return f, flat0


def _hvp(f, flat0: Tensor, V: Tensor) -> Tensor:
    g = torch.func.grad(f)
    return torch.stack([torch.func.jvp(g, (flat0,), (V[:, j],))[1] for j in range(V.shape[1])], 1)


def _gpt2_loss(batch):
    return lambda call: lm_loss(call(input_ids=batch["input_ids"]).logits, batch["labels"])


# ------------------------------------------------------------------ item 1: attention
def test_gpt2_default_attention_hessian_equals_eager_dense():
    model, eager = tiny_gpt2("sdpa"), tiny_gpt2("eager")
    assert model.config._attn_implementation == "sdpa"
    batch = token_batch(2, 6, ignore=2)
    H = Hessian(model, None, batch)
    assert any("math SDPA" in n for n in H.notes)
    names = [n for n, _ in model.named_parameters() if ".attn." in n]
    f, flat0 = _flat_fn(eager, names, _gpt2_loss(batch))
    assert_close(Hessian(model, None, batch, params=names).to_dense(), torch.func.hessian(f)(flat0))
    f_all, flat_all = _flat_fn(eager, H.param_names, _gpt2_loss(batch))
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert_close(H @ V, _hvp(f_all, flat_all, V))


def test_vit_fused_attention_hessian_equals_eager_dense():
    model, eager = tiny_vit(fused=True), tiny_vit(fused=False)
    X = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    names = [n for n, _ in model.named_parameters() if ".attn." in n]
    f, flat0 = _flat_fn(eager, names, lambda call: CE(call(X), y))
    assert_close(Hessian(model, CE, (X, y), params=names).to_dense(), torch.func.hessian(f)(flat0))
    H = Hessian(model, CE, (X, y))
    f_all, flat_all = _flat_fn(eager, H.param_names, lambda call: CE(call(X), y))
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    assert_close(H @ V, _hvp(f_all, flat_all, V))
    assert_close(H.gradient(), torch.func.grad(f_all)(flat_all))


def test_flash_attention_refused_naming_the_fix():
    model = tiny_gpt2("eager")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(HesslabError, match=r"GPT2LMHeadModel.*flash_attention_2.*eager"):
        Hessian(model, None, token_batch(2, 4))


# ------------------------------------------------------------------ item 2: batches, losses
def test_dict_batches_with_model_loss_equal_pairs_with_explicit_loss():
    from transformers import BatchEncoding

    model = tiny_gpt2()
    batch = token_batch(2, 6, ignore=3, seed=1)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    H_dict = Hessian(model, None, [BatchEncoding(batch)])
    H_pair = Hessian(
        model, lambda out, y: lm_loss(out.logits, y), ({"input_ids": batch["input_ids"]}, batch["labels"])
    )
    assert_close(H_dict @ V, H_pair @ V)
    assert abs(H_dict.loss() - float(model(**batch).loss.detach())) < 1e-6  # transformers' loss (float32)


def test_token_weighting_over_batches_of_different_lengths():
    model = tiny_gpt2()
    b1, b2 = token_batch(2, 4, ignore=1, seed=2), token_batch(3, 7, ignore=4, seed=3)
    # one batch of all tokens: right-padding with -100 labels changes no real token's logits
    ids = torch.zeros(5, 7, dtype=torch.long)
    labels = torch.full((5, 7), -100)
    ids[:2, :4], labels[:2, :4] = b1["input_ids"], b1["labels"]
    ids[2:], labels[2:] = b2["input_ids"], b2["labels"]
    whole = {"input_ids": ids, "labels": labels}
    H_two, H_one = Hessian(model, None, [b1, b2]), Hessian(model, None, whole)
    assert H_two._md.count() == int((b1["labels"][:, 1:] != -100).sum() + (b2["labels"][:, 1:] != -100).sum())
    V = torch.randn(H_one.shape[0], 2, dtype=torch.float64)
    assert_close(H_two @ V, H_one @ V)
    assert abs(H_two.loss() - H_one.loss()) < 1e-12


def test_params_none_selects_the_trainable_adapter():
    class Adapted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(4, 3).double().requires_grad_(False)
            self.lora_a = nn.Parameter(torch.randn(2, 4, dtype=torch.float64))
            self.lora_b = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            return self.base(x) + x @ self.lora_a.T @ self.lora_b.T

    model = Adapted()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    H = Hessian(model, CE, (X, y))
    assert H.param_names == ["lora_a", "lora_b"]
    assert_close(H.to_dense(), Hessian(model, CE, (X, y), params=["lora_a", "lora_b"]).to_dense())


def test_bad_transformers_style_input_is_named():
    lin = nn.Linear(4, 3).double()
    with pytest.raises(HesslabError, match=r"loss_fn: None.*\.loss"):
        Hessian(lin, None, (torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.long)))
    batch = token_batch(2, 4)
    del batch["labels"]
    with pytest.raises(HesslabError, match=r"data: batch 0 is a dict without a 'labels'"):
        Hessian(tiny_gpt2(), None, [batch])


# ------------------------------------------------------------------ item 5: closed-form CE curvature
def test_gpt2_ggn_closed_form_equals_double_backward():
    model = tiny_gpt2()
    batches = [token_batch(2, 5, ignore=2, seed=4), token_batch(1, 7, seed=5)]
    G = GGN(model, None, batches, output_curvature="analytic")
    V = torch.randn(G.shape[0], 2, dtype=torch.float64)
    ref = GGN(model, None, batches, output_curvature="autograd") @ V
    assert_close(G @ V, ref)
    assert_close(GGN(model, None, batches, method="func", output_curvature="analytic") @ V, ref)

    class Logits(nn.Module):  # the wrapper hesslab makes unnecessary
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, **kw: Tensor) -> Tensor:
            return self.m(**kw).logits

    pair = GGN(Logits(), lm_loss, ({"input_ids": batches[0]["input_ids"]}, batches[0]["labels"]))
    assert_close(GGN(model, None, batches[0], output_curvature="analytic") @ V, pair @ V)


# ------------------------------------------------------------------ item 3: KFAC
def _layer_output_hessian(model, batch, layer: nn.Module) -> tuple[Tensor, Tensor]:
    """Hand-built: the layer's inputs x (B, T, in) and ∇²_δ Σ_tokens ℓ for δ added to its output."""
    ids, labels = batch["input_ids"], batch["labels"]
    seen = {}

    def record(m, a, o):
        seen["x"] = a[0].detach()

    h = layer.register_forward_hook(record)
    with torch.no_grad():
        out_shape = model(input_ids=ids).logits.shape
    h.remove()
    tokens = int((labels[:, 1:] != -100).sum())
    z_shape = (*seen["x"].shape[:-1], layer.nf)

    def loss_sum(delta: Tensor) -> Tensor:
        hook = layer.register_forward_hook(lambda m, a, o: o + delta)
        try:
            return lm_loss(model(input_ids=ids).logits, labels) * tokens
        finally:
            hook.remove()

    assert out_shape[:2] == labels.shape
    return seen["x"], torch.func.hessian(loss_sum)(torch.zeros(z_shape, dtype=torch.float64)), tokens


def test_kfac_gpt2_covers_every_conv1d_and_matches_hand_built_factors():
    import warnings

    from hesslab.linops import KFAC

    model = tiny_gpt2()
    batch = token_batch(2, 5, ignore=2, seed=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = KFAC(model, None, batch)
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert K.layer_names == conv1d
    assert "tied" in K.skipped["lm_head"] and "transformer.wte.weight" in K.skipped["lm_head"]
    assert {"transformer.wte", "transformer.h.0.ln_1"} <= set(K.skipped)
    assert any("kfac_approx='expand'" in n for n in K.notes) and any("math SDPA" in n for n in K.notes)
    assert any("lm_head" in str(w.message) and "tied" in str(w.message) for w in caught)
    with pytest.raises(HesslabError, match=r"'lm_head.weight' is tied to 'transformer.wte.weight'"):
        Hessian(model, None, batch, params="lm_head.weight")

    name = "transformer.h.0.mlp.c_fc"
    layer = dict(model.named_modules())[name]
    x, Hd, tokens = _layer_output_hessian(model, batch, layer)  # Hd (B, T, o, B, T, o)
    Bsz, T, o = Hd.shape[:3]
    B_ref = sum(Hd[j, t, :, j, t, :] for j in range(Bsz) for t in range(T)) / tokens
    xt = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1).reshape(-1, x.shape[-1] + 1)
    A_ref = xt.T @ xt / (Bsz * T)
    A, B = K.factors[name]
    assert_close(A, A_ref)
    assert_close(B, B_ref, rtol=1e-7)
    # the layout: Conv1D stores (in, out); K acts on the model's own vectors
    sl = K.layer_slice(name)
    i, _ = layer.weight.shape
    v = torch.zeros(K.shape[0], dtype=torch.float64)
    v[sl] = torch.randn(sl.stop - sl.start, dtype=torch.float64)
    Vw, Vb = v[sl][: i * o].reshape(i, o), v[sl][i * o:]
    R = B_ref @ torch.cat([Vw.T, Vb[:, None]], 1) @ A_ref
    assert_close((K @ v)[sl], torch.cat([R[:, :i].T.reshape(-1), R[:, i]]), rtol=1e-7)


def _vit_output_hessian(model: nn.Module, X: Tensor, y: Tensor, layer: nn.Module) -> tuple[Tensor, Tensor]:
    """Hand-built for a (B, T, C)-output layer of the eager ViT: its inputs x (n, T, in) and
    ∇²_δ Σ_j ℓ_j (n, T, o, n, T, o) for δ added to its output."""
    seen = {}
    h = layer.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), shape=o.shape))
    with torch.no_grad():
        model(X)
    h.remove()

    def loss_sum(delta: Tensor) -> Tensor:
        hook = layer.register_forward_hook(lambda m, a, o: o + delta)
        try:
            return F.cross_entropy(model(X), y, reduction="sum")
        finally:
            hook.remove()

    return seen["x"], torch.func.hessian(loss_sum)(torch.zeros(seen["shape"], dtype=torch.float64)).detach()


@pytest.mark.parametrize("name", ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"])
def test_kfac_vit_exact_expand_factors_match_hand_built_ones(name):
    """The exact E[M] of a token-shared layer: Σ_j Σ_t M_j[t, t] / n from a dense Hessian with
    respect to the layer's output; the Gauss-Newton M is far from it here (attention, GELU and
    LayerNorm after the layer), so the exact mode must not be the Gauss-Newton one."""
    from hesslab.linops import KFAC

    model, eager = tiny_vit(fused=True), tiny_vit(fused=False)
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=gen)
    K = KFAC(model, CE, (X, y), layers=name)
    assert K.exact_layers == [name]
    x, Hd = _vit_output_hessian(eager, X, y, dict(eager.named_modules())[name])
    n, T, o = Hd.shape[:3]
    B_ref = sum(Hd[j, t, :, j, t, :] for j in range(n) for t in range(T)) / n
    xt = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1).reshape(-1, x.shape[-1] + 1)
    A, B = K.factors[name]
    assert_close(A, xt.T @ xt / (n * T))
    assert_close(B, B_ref, rtol=1e-7)
    B_ggn = KFAC(model, CE, (X, y), layers=name, curvature="ggn").factors[name].B
    assert float((B_ggn - B_ref).norm()) > 0.1 * float(B_ref.norm())


def test_large_vocabulary_takes_the_closed_form_on_the_func_path():
    model = tiny_gpt2(vocab=4096)
    batch = token_batch(2, 8, vocab=4096, ignore=3, seed=9)  # 2·8·4096 = 2¹⁶ logits
    G = GGN(model, None, batch)
    assert G.hvp_path == "func"
    V = torch.randn(G.shape[0], 2, dtype=torch.float64)
    assert_close(G @ V, GGN(model, None, batch, method="autograd", output_curvature="autograd") @ V)
