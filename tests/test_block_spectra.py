"""Per-block spectra (Zhang et al. 2024) of a tiny GPT-2 built from a config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hesslab.analysis.block_spectra import BlockSpectra, Block, block_spectra, default_blocks, js_distance
from hesslab.errors import HesslabError
from hesslab.linops import DenseOperator, Hessian, SubblockOperator
from hesslab.solvers import spectral_density
from tests.models import tiny_gpt2, token_batch

pytest.importorskip("transformers")

STEPS, PROBES = 8, 2


def test_default_blocks_split_fused_qkv_and_list_embeddings_and_norms():
    names = [b.name for b in default_blocks(tiny_gpt2())]
    attn = "transformer.h.0.attn"
    for part in ("q", "k", "v"):
        assert f"{attn}.c_attn.{part}" in names
    for name in (f"{attn}.c_proj", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                 "transformer.wte", "transformer.wpe", "transformer.h.0.ln_1", "transformer.ln_f"):
        assert name in names
    assert not any(n.startswith("lm_head") for n in names)  # tied to wte: one block


def test_params_restrict_the_default_blocks():
    model, batch = tiny_gpt2(), token_batch(2, 5, seed=7)
    c_attn = "transformer.h.0.attn.c_attn"
    every = {b.name: b for b in default_blocks(model)}
    chosen = default_blocks(model, params=["transformer.h.0.mlp.*", "transformer.ln_f"])
    assert [b.name for b in chosen] == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.ln_f"]
    assert all(b.params == every[b.name].params for b in chosen)
    # the fused weight without its bias: q/k/v blocks of the weight alone, the matching dense sub-blocks
    weight_only = default_blocks(model, params=f"{c_attn}.weight")
    assert [b.name for b in weight_only] == [f"{c_attn}.{p}" for p in "qkv"]
    H = Hessian(model, None, batch, params=f"{c_attn}.weight").to_dense()
    i, three_e = dict(model.named_parameters())[f"{c_attn}.weight"].shape
    e = three_e // 3
    for j, b in enumerate(weight_only):
        assert b.params == [f"{c_attn}.weight"]
        idx = (torch.arange(i)[:, None] * three_e + torch.arange(j * e, (j + 1) * e)).reshape(-1)
        torch.testing.assert_close(b.index, idx)
        op = SubblockOperator(Hessian(model, None, batch, params=b.params), b.index)
        torch.testing.assert_close(op.to_dense(), H[idx][:, idx], rtol=1e-10, atol=1e-12)
    res = block_spectra(model, None, batch, num_steps=4, num_probes=1, params="transformer.h.0.mlp.c_fc")
    assert res.names == ["transformer.h.0.mlp.c_fc"]
    with pytest.raises(HesslabError, match="params: restricts the default blocks"):
        block_spectra(model, None, batch, blocks=chosen, params="transformer.ln_f")


def test_block_spectrum_equals_the_params_sub_operator(tmp_path):
    model, batch = tiny_gpt2(), token_batch(2, 5, seed=7)
    c_attn = "transformer.h.0.attn.c_attn"
    blocks = [b for b in default_blocks(model) if b.name in (f"{c_attn}.k", "transformer.h.0.mlp.c_fc")]
    res = block_spectra(model, None, batch, blocks=blocks, num_steps=STEPS, num_probes=PROBES)
    # a whole-parameter block: the spectrum of Hessian(params=...)
    ref = spectral_density(Hessian(model, None, batch, params="transformer.h.0.mlp.c_fc"), STEPS, PROBES)
    got = res.densities["transformer.h.0.mlp.c_fc"]
    np.testing.assert_allclose(got.nodes, ref.nodes, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got.moments(2), ref.moments(2), rtol=1e-8)
    # a slice of c_attn (the key columns): the dense sub-block of the parameter's Hessian
    H = Hessian(model, None, batch, params=[f"{c_attn}.weight", f"{c_attn}.bias"]).to_dense()
    i, three_e = dict(model.named_parameters())[f"{c_attn}.weight"].shape
    e = three_e // 3
    cols = torch.arange(e, 2 * e)
    idx = torch.cat([(torch.arange(i)[:, None] * three_e + cols).reshape(-1), i * three_e + cols])
    sub = H[idx][:, idx]
    k_block = next(b for b in blocks if b.name.endswith(".k"))
    op = SubblockOperator(Hessian(model, None, batch, params=k_block.params), k_block.index)
    torch.testing.assert_close(op.to_dense(), sub, rtol=1e-10, atol=1e-12)
    ref_k = spectral_density(DenseOperator(sub), STEPS, PROBES)
    np.testing.assert_allclose(res.densities[f"{c_attn}.k"].nodes, ref_k.nodes, rtol=1e-8, atol=1e-10)
    # heterogeneity, the plot, save/load
    assert res.js.shape == (2, 2) and 0.0 <= res.heterogeneity <= 1.0
    assert res.js[0, 1] == res.js[1, 0] == res.heterogeneity
    assert res.plot().get_yscale() == "log"
    for suffix in (".json", ".npz"):
        back = BlockSpectra.load(res.save(tmp_path / f"b{suffix}"))
        assert back.names == res.names
        np.testing.assert_allclose(back.densities[f"{c_attn}.k"].nodes, res.densities[f"{c_attn}.k"].nodes)


def test_js_distance_bounds_and_default_run():
    p = np.array([1.0, 0, 0])
    assert js_distance(p, p) == 0.0
    assert abs(js_distance(p, np.array([0, 0, 1.0])) - 1.0) < 1e-12
    res = block_spectra(tiny_gpt2(), None, token_batch(2, 4, seed=8), num_steps=4, num_probes=1)
    assert len(res.names) == len(default_blocks(tiny_gpt2())) and res.js.shape == (len(res.names),) * 2
