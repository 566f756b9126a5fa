"""Data handling for curvature operators: one batch or an iterable of batches.

A batch is a pair ``(inputs, targets)``: ``targets`` is a tensor handed to
``loss_fn(output, targets)``; ``inputs`` is a tensor (``model(inputs)``), a tuple or
list of tensors (``model(*inputs)``) or a dict (``model(**inputs)``). A batch may also
be a mapping as transformers users write it (a dict, ``BatchEncoding``, ``UserDict``):
the model's keyword arguments, ``labels`` included, ``model(**batch)``; its targets are
``batch["labels"]`` (for ``loss_fn`` and the batch's weight; with ``loss_fn=None`` the
model's own loss is used, see :mod:`hesslab.linops._lmloss`). ``data`` is one batch, or
an iterable of batches that can be iterated more than once (a list, a ``DataLoader``):
it is iterated once per product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from hesslab.errors import HesslabError

Batch = tuple[Any, Tensor]


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one batch (a pair or a mapping) rather than an iterable of them."""
    if isinstance(data, Mapping):
        return True
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and isinstance(data[0], (Tensor, tuple, list, Mapping))
    )


def input_tensors(inputs: Any) -> list[Tensor]:
    """The tensors among a batch's inputs (a tensor, a sequence or a dict of them)."""
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [v for v in inputs.values() if isinstance(v, Tensor)]
    if isinstance(inputs, (tuple, list)):
        return [v for v in inputs if isinstance(v, Tensor)]
    return []


def map_inputs(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor of the inputs, keeping the container."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(fn(v) if isinstance(v, Tensor) else v for v in inputs)
    return inputs


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)`` by the inputs' type."""
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def default_batch_size(inputs: Any, targets: Tensor) -> int:
    """The number of samples of a batch: the first dimension of the targets.

    Scalar targets fall back on the first dimension of the first input tensor.
    """
    if targets.dim() >= 1:
        return int(targets.shape[0])
    tensors = input_tensors(inputs)
    if tensors and tensors[0].dim() >= 1:
        return int(tensors[0].shape[0])
    return 1


class DataSource:
    """Re-iterable access to ``data`` with validation of every batch.

    Args:
        data: One ``(inputs, targets)`` batch or a re-iterable iterable of batches.
        batch_size_fn: ``(inputs, targets) -> int``, the number of samples of a batch
            (its weight); defaults to :func:`default_batch_size`.

    Raises:
        HesslabError: ``data`` is neither a batch nor an iterable, or is a one-shot
            iterator (a generator).
    """

    def __init__(self, data: Any, batch_size_fn: Callable[[Any, Tensor], int] | None = None):
        self.single = is_single_batch(data)
        self.batch_size_fn = batch_size_fn or default_batch_size
        if self.single:
            self.data = data
            return
        if isinstance(data, (Tensor, str, bytes)) or data is None:
            raise HesslabError(
                "data: expected one (inputs, targets) batch or an iterable of such batches "
                f"(a list, a DataLoader), got {type(data).__name__}"
            )
        try:
            it = iter(data)
        except TypeError:
            raise HesslabError(
                "data: expected one (inputs, targets) batch or an iterable of such batches "
                f"(a list, a DataLoader), got {type(data).__name__}"
            ) from None
        if it is data:
            raise HesslabError(
                "data: got a one-shot iterator (e.g. a generator); the operator iterates over "
                "the data once per product. Pass a list of batches or a DataLoader."
            )
        self.data = data

    def __len__(self) -> int:
        if self.single:
            return 1
        try:
            return len(self.data)
        except TypeError:
            return 0

    def batches(self) -> Iterator[tuple[int, Any, Tensor, int]]:
        """Yield ``(index, inputs, targets, num_samples)``, skipping empty batches.

        Raises:
            HesslabError: a batch is not an ``(inputs, targets)`` pair, or the data holds
                no sample at all.
        """
        source = [self.data] if self.single else self.data
        total = 0
        for index, batch in enumerate(source):
            inputs, targets = self._unpack(batch, index)
            size = int(self.batch_size_fn(inputs, targets))
            if size < 0:
                raise HesslabError(f"batch_size_fn: returned {size} for batch {index}")
            if size == 0:
                continue
            total += size
            yield index, inputs, targets, size
        if total == 0:
            raise HesslabError(
                "data: holds no samples (empty iterable or only empty batches); the loss is "
                "the mean over the data and needs at least one sample"
            )

    @staticmethod
    def _unpack(batch: Any, index: int) -> Batch:
        if isinstance(batch, Mapping):
            return _unpack_mapping(batch, index)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise HesslabError(
                f"data: batch {index} is a {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                + "; expected an (inputs, targets) pair or a dict of the model's keyword arguments"
            )
        inputs, targets = batch
        if not isinstance(targets, Tensor):
            raise HesslabError(
                f"data: the targets of batch {index} are a {type(targets).__name__}, "
                "expected a tensor"
            )
        if not input_tensors(inputs):
            raise HesslabError(
                f"data: the inputs of batch {index} are a {type(inputs).__name__} holding no "
                "tensor; expected a tensor, or a tuple/list/dict of tensors"
            )
        return inputs, targets


def _unpack_mapping(batch: Mapping, index: int) -> Batch:
    """A mapping batch: every entry is a keyword argument; the targets are its labels."""
    inputs = dict(batch)
    labels = inputs.get("labels")
    if not isinstance(labels, Tensor):
        keys = ", ".join(repr(k) for k in inputs) or "none"
        raise HesslabError(
            f"data: batch {index} is a dict without a 'labels' tensor (keys: {keys}). A dict batch "
            "is passed as model(**batch) and its labels are the targets (the model's own loss "
            "with loss_fn=None needs them): add batch['labels'] (for a causal language model, "
            "labels = input_ids), or pass (inputs, targets) pairs."
        )
    if not input_tensors(inputs):  # pragma: no cover - labels is a tensor
        raise HesslabError(f"data: batch {index} holds no tensor")
    return inputs, labels


def check_devices(inputs: Any, targets: Tensor, device: torch.device, index: int) -> None:
    """Raise unless every tensor of the batch lives on ``device`` (the model's)."""
    for t in [*input_tensors(inputs), targets]:
        if t.device != device:
            raise HesslabError(
                f"data: batch {index} holds a tensor on {t.device} but the model's parameters are "
                f"on {device}; move the data (or the model) so that both are on one device, "
                f"e.g. (inputs.to('{device}'), targets.to('{device}'))"
            )


def cast_floating(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` when it is floating; integer (and boolean) tensors stay as they are."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def cast_batch(inputs: Any, targets: Tensor, dtype: torch.dtype | None) -> Batch:
    """Cast the floating tensors of a batch to ``dtype`` (integers stay as they are)."""
    if dtype is None:
        return inputs, targets
    return map_inputs(inputs, lambda t: cast_floating(t, dtype)), cast_floating(targets, dtype)
