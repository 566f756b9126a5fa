"""Small models and the digits data used by the demo, the benchmarks and the examples.

Everything here works offline: the data is scikit-learn's bundled 8×8 digits (1,797
images, 10 classes), and training takes seconds on a CPU.

    digits(...)        (train, test) splits as float tensors, inputs in [0, 1]
    digits_mlp(...)    64 → hidden → 10 MLP, optional BatchNorm
    digits_cnn(...)    1×8×8 → conv → conv → linear, optional BatchNorm
    resnet_small(...)  a ResNet-style CNN with BatchNorm (about 0.3–1M parameters) for speed tests
    resnet18_cifar()   ResNet-18 for 32×32 inputs (about 11M parameters), for the GPU suite
    train(...)         a few epochs of SGD with momentum, optionally saving checkpoints
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .errors import require

Batch = tuple[Tensor, Tensor]


def digits(
    image: bool = False, test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Batch, Batch]:
    """scikit-learn's digits as ((X_train, y_train), (X_test, y_test)).

    Args:
        image: shape inputs (N, 1, 8, 8) for CNNs instead of (N, 64).
        test_fraction: share of samples held out, split with ``seed``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("hesslab.zoo.digits needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    X = torch.tensor(d.data, dtype=dtype) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    if image:
        X = X.reshape(-1, 1, 8, 8)
    n_test = int(round(test_fraction * len(y)))
    return (X[n_test:], y[n_test:]), (X[:n_test], y[:n_test])


def digits_mlp(hidden: Sequence[int] = (32, 32), batchnorm: bool = False, seed: int = 0) -> nn.Sequential:
    """64 → hidden… → 10 with ReLU (and BatchNorm1d after each hidden Linear when asked)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h)] + ([nn.BatchNorm1d(h)] if batchnorm else []) + [nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def digits_cnn(channels: Sequence[int] = (8, 16), batchnorm: bool = False, seed: int = 0) -> nn.Sequential:
    """1×8×8 → conv3×3 → [BN] → ReLU → conv3×3 stride 2 → [BN] → ReLU → flatten → linear 10."""
    torch.manual_seed(seed)
    c1, c2 = channels
    bn = (lambda c: [nn.BatchNorm2d(c)]) if batchnorm else (lambda c: [])
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), *bn(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), *bn(c2), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * 16, 10),
    )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: stem conv, stages of basic blocks, global pool, linear."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        stages, cin = [], widths[0]
        for i, (w, nb) in enumerate(zip(widths, blocks)):
            for b in range(nb):
                stages.append(_Block(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def resnet_small(in_channels: int = 1, num_classes: int = 10, seed: int = 0) -> ResNet:
    """About 0.31M parameters (widths 32-64-128, one block per stage), BatchNorm throughout."""
    torch.manual_seed(seed)
    return ResNet((32, 64, 128), (1, 1, 1), in_channels, num_classes)


def resnet18_cifar(num_classes: int = 10, seed: int = 0) -> ResNet:
    """ResNet-18 for 32×32 RGB inputs (about 11M parameters)."""
    torch.manual_seed(seed)
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), 3, num_classes)

class DigitsTransformer(nn.Module):
    """A tiny transformer encoder on the digits: each 8×8 image (N, 64) is a sequence of
    its 8 rows of 8 pixels, embedded by a linear map plus a learned position embedding,
    then ``num_layers`` ``nn.TransformerEncoderLayer`` (pre-norm, no dropout), a mean over
    the rows and a linear head to 10 classes."""

    def __init__(self, d_model: int = 16, nhead: int = 2, num_layers: int = 1, dim_feedforward: int = 32):
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(8, d_model))
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True,
                                       norm_first=True)
            for _ in range(num_layers))
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.reshape(-1, 8, 8)) + self.pos
        for layer in self.encoder:
            h = layer(h)
        return self.head(h.mean(dim=1))


def digits_transformer(d_model: int = 16, nhead: int = 2, num_layers: int = 1, seed: int = 0) -> DigitsTransformer:
    """The demo's transformer (:class:`DigitsTransformer`) on the flat digits (N, 64)."""
    torch.manual_seed(seed)
    return DigitsTransformer(d_model, nhead, num_layers)


def batches(data: Batch, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
    """Mini-batches of (X, y); the last one may be smaller."""
    X, y = data
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    for s in range(0, len(y), batch_size):
        j = idx[s : s + batch_size]
        yield X[j], y[j]


def train(
    model: nn.Module,
    data: Batch,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> list[float]:
    """SGD with momentum 0.9; returns the mean training loss per epoch.

    ``on_epoch(epoch, model)`` is called after each epoch (e.g. to save a checkpoint or
    to track the spectrum); the model is left in eval mode.
    """
    require(epochs >= 0, f"epochs must be >= 0, got {epochs}")
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = []
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for X, y in batches(data, batch_size, shuffle=True, seed=seed + epoch):
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            count += len(y)
        history.append(total / max(count, 1))
        model.eval()
        if on_epoch is not None:
            on_epoch(epoch, model)
    model.eval()
    return history


def accuracy(model: nn.Module, data: Batch) -> float:
    """Share of correctly classified samples (eval mode, no grad)."""
    model.eval()
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).float().mean())
