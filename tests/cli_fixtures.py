"""Model, loader and loss factories for ``hesslab analyze`` in tests/test_cli.py.

``hesslab analyze --model tests.cli_fixtures:tiny_mlp --data tests.cli_fixtures:loader``
loads these by name, as it loads a user's own factories.

    tiny_mlp()            8 -> 6 -> 3 with ReLU, 75 parameters
    other_mlp()           8 -> 5 -> 3: a state_dict of it does not fit tiny_mlp
    loader()              a DataLoader of 48 samples in 3 batches (8 features, 3 classes)
    single_batch()        the same data as one (inputs, targets) pair
    wrong_shape_loader()  inputs with 5 features instead of 8
    bn_mlp()              8 -> 6 (BatchNorm) -> 3: its Hessian differs in train and eval mode
    broken_factory()      raises
    rank1_broken_mlp()    tiny_mlp(), except that it raises on torchrun's rank 1 (RANK=1)
    my_cross_entropy      a plain loss function (pkg.module:fn)
    gpt2_tiny()           a GPT-2 from a config (1 layer, 16 wide, vocabulary 32), random init
    lm_loader()           2 dict batches {"input_ids", "labels"} of 2 sequences of 8 tokens
    lm_loader_no_labels() the same batches without "labels"
    vit_tiny()            a timm VisionTransformer from a config (1x8x8 images, embed 8, depth 1, 3 classes)
    image_loader()        2 batches of 4 random 1x8x8 images with class targets
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_SAMPLES = 48
NUM_FEATURES = 8
NUM_CLASSES = 3


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(NUM_FEATURES, 6), nn.ReLU(), nn.Linear(6, NUM_CLASSES))


def other_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(NUM_FEATURES, 5), nn.ReLU(), nn.Linear(5, NUM_CLASSES))


def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(NUM_FEATURES, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, NUM_CLASSES))
    with torch.no_grad():  # running statistics far from the batch statistics
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(4.0)
    return model


def _data(features: int = NUM_FEATURES) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(NUM_SAMPLES, features, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=gen)
    return X, y


def loader() -> DataLoader:
    return DataLoader(TensorDataset(*_data()), batch_size=16, shuffle=False)


def single_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return _data()


def wrong_shape_loader() -> DataLoader:
    return DataLoader(TensorDataset(*_data(features=5)), batch_size=16)


def broken_factory() -> nn.Module:
    raise RuntimeError("this factory is broken on purpose")


def rank1_broken_mlp() -> nn.Module:
    import os

    if os.environ.get("RANK") == "1":
        raise RuntimeError("this factory fails on rank 1 only")
    return tiny_mlp()


def my_cross_entropy(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, targets)


LM_VOCAB = 32


def gpt2_tiny() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=LM_VOCAB, n_positions=16))


def lm_loader() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, LM_VOCAB, (2, 8), generator=gen)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


def lm_loader_no_labels() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": b["input_ids"]} for b in lm_loader()]


def vit_tiny() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)  # timm's default attention: fused scaled-dot-product (switched by hesslab)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=NUM_CLASSES, embed_dim=8, depth=1,
                             num_heads=2, mlp_ratio=2.0)


def image_loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, NUM_CLASSES, (4,), generator=gen))
            for _ in range(2)]
