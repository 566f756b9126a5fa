"""Small deterministic models and data for the tests.

Every factory takes a ``seed`` (the weights depend on nothing else), a ``dtype``
(float64 by default, so that dense oracles are exact to ~1e-12) and a ``device``.
BatchNorm layers get non-trivial running statistics (and affine parameters), so that
eval mode differs from the identity and from train mode.

Sizes are small on purpose: dense Hessians by ``torch.func.hessian`` over all the
parameters take milliseconds.

    mlp()         4 -> 6 -> 3, tanh                         51 parameters (63 with BatchNorm)
    cnn()         1x6x6 -> conv3x3(3) -> relu -> linear 3   177 parameters (183 with BatchNorm)
    linear_net()  deep linear network without bias (Singh et al.), widths (4, 5, 3): 35
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from hesslab.linops import DenseOperator

__all__ = [
    "mlp",
    "cnn",
    "linear_net",
    "classification_data",
    "regression_data",
    "image_data",
    "num_params",
    "tiny_gpt2",
    "tiny_vit",
    "token_batch",
    "fully_shard_model",
]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def _finish(
    model: nn.Module, seed: int, dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    """Reinitialize every parameter and BatchNorm buffer from ``seed``; cast; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen))
                module.bias.copy_(0.1 * torch.randn(c, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return model.to(device=device, dtype=dtype).eval()


def mlp(
    in_features: int = 4,
    hidden: Sequence[int] = (6,),
    out_features: int = 3,
    *,
    batchnorm: bool = False,
    dropout: float = 0.0,
    activation: str = "tanh",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> nn.Sequential:
    """A fully connected network ``Linear -> [BatchNorm1d] -> act -> [Dropout] -> ... -> Linear``.

    Args:
        in_features, hidden, out_features: The widths.
        batchnorm: Add a BatchNorm1d after every hidden Linear layer.
        dropout: Add Dropout(p) after every hidden activation when p > 0.
        activation: ``"tanh"`` (default: smooth, so the functional part is rich),
            ``"relu"``, ``"sigmoid"`` or ``"gelu"``.
    """
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(_ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_features))
    return _finish(nn.Sequential(*layers), seed, dtype, device)


def cnn(
    in_channels: int = 1,
    image_size: int = 6,
    channels: int = 3,
    num_classes: int = 3,
    *,
    batchnorm: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> nn.Sequential:
    """``Conv2d(k=3, no padding) -> [BatchNorm2d] -> ReLU -> Flatten -> Linear``.

    Inputs have shape (N, in_channels, image_size, image_size).
    """
    side = image_size - 2
    layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(channels))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(channels * side * side, num_classes)]
    return _finish(nn.Sequential(*layers), seed, dtype, device)


def linear_net(
    widths: Sequence[int] = (4, 5, 3),
    *,
    bias: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> nn.Sequential:
    """A deep linear network W_L ⋯ W_1 x with ``widths = (d, M_1, ..., K)``."""
    layers = [nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:])]
    return _finish(nn.Sequential(*layers), seed, dtype, device)


def num_params(model: nn.Module) -> int:
    """The number of parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def classification_data(
    num_samples: int = 20,
    in_shape: int | Sequence[int] = 4,
    num_classes: int = 3,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Gaussian inputs (num_samples, *in_shape) and uniform labels (num_samples,) in [0, num_classes)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    X = torch.randn(num_samples, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (num_samples,), generator=gen)
    return X.to(device=device, dtype=dtype), y.to(device)


def image_data(
    num_samples: int = 20,
    in_channels: int = 1,
    image_size: int = 6,
    num_classes: int = 3,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Classification data shaped for :func:`cnn`: (N, C, S, S) inputs, (N,) labels."""
    return classification_data(
        num_samples, (in_channels, image_size, image_size), num_classes,
        seed=seed, dtype=dtype, device=device,
    )


def regression_data(
    num_samples: int = 20,
    in_features: int = 4,
    out_features: int = 3,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Gaussian inputs (N, in_features) and targets (N, out_features): a fixed random
    linear map of the inputs plus noise."""
    gen = torch.Generator().manual_seed(seed + 2000)
    X = torch.randn(num_samples, in_features, generator=gen, dtype=torch.float64)
    W = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    Y = X @ W.T + 0.1 * torch.randn(num_samples, out_features, generator=gen, dtype=torch.float64)
    return X.to(device=device, dtype=dtype), Y.to(device=device, dtype=dtype)


# ------------------------------------------------------------------ transformers (tiny, no download)
def tiny_gpt2(attn: str = "sdpa", seed: int = 0, n_layer: int = 1, n_embd: int = 8, vocab: int = 16,
              n_positions: int = 8) -> nn.Module:
    """transformers ``GPT2LMHeadModel`` from a config (float64, eval): ~1.1k parameters.

    ``attn`` is the attention implementation ("sdpa", the default, or "eager"); the
    weights depend on ``seed`` only, so two calls with different ``attn`` are one model.
    ``lm_head.weight`` is tied to ``transformer.wte.weight``, as in GPT-2.
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab, n_positions=n_positions,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        loss_type="ForCausalLM", attn_implementation=attn,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than GPT-2's 0.02 init: a non-trivial Hessian
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.double().eval()


def tiny_vit(fused: bool = True, seed: int = 0) -> nn.Module:
    """timm ``VisionTransformer`` on 1x8x8 images, 3 classes (float64, eval): ~400 parameters.

    ``fused`` is every attention block's ``fused_attn`` (timm's default on torch 2 is True,
    i.e. ``F.scaled_dot_product_attention``).
    """
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2,
        mlp_ratio=2.0,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model.double().eval()


def token_batch(batch: int, length: int, vocab: int = 16, seed: int = 0, ignore: int = 0) -> dict:
    """A causal-LM batch ``{"input_ids", "labels"}`` with ``ignore`` labels set to -100."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = ids.clone()
    if ignore:
        flat = labels.view(-1)
        flat[torch.randperm(flat.numel(), generator=gen)[:ignore]] = -100
    return {"input_ids": ids, "labels": labels}


class Interrupting(DenseOperator):
    """A DenseOperator that raises KeyboardInterrupt once it has applied ``after`` columns
    (a Ctrl-C in the middle of a long run, for the checkpoint/resume tests)."""

    def __init__(self, matrix, after):
        super().__init__(matrix)
        self.after = after

    def _matmat(self, V):
        if self.num_matvecs >= self.after:
            raise KeyboardInterrupt
        return super()._matmat(V)


def interrupted_and_resumed(run, A, after: int, path):
    """``run(op, **kw)`` on DenseOperator(A) in one go, and again interrupted after ``after``
    products (checkpoint ``path``, written only at the interruption) then resumed from the
    file: returns (full, resumed). The checkpoint must exist after the interruption."""
    full = run(DenseOperator(A))
    with pytest.raises(KeyboardInterrupt):
        run(Interrupting(A, after=after), checkpoint=path, checkpoint_every=1000)
    assert path.exists()
    return full, run(DenseOperator(A), checkpoint=path)


# ------------------------------------------------------------------ FSDP2 (torch.distributed running)
def fully_shard_model(model: nn.Module, blocks: Sequence[nn.Module] | None = None, **kwargs) -> nn.Module:
    """``fully_shard`` each of ``blocks`` (default: every Linear), then the root; returns ``model``.

    Needs a default process group. ``kwargs`` go to every ``fully_shard`` call
    (``mp_policy=``, ``reshard_after_forward=``).
    """
    from torch.distributed.fsdp import fully_shard

    for block in [m for m in model.modules() if isinstance(m, nn.Linear)] if blocks is None else blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
