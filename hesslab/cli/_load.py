"""Loading the objects ``hesslab analyze`` is given: ``--model``, ``--checkpoint``,
``--loss``, ``--data``; every error is a HesslabError that names the option."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from hesslab.errors import HesslabError

__all__ = ["LOSSES", "MODEL_LOSS", "import_object", "load_model", "load_checkpoint", "load_loss", "default_loss",
           "load_data", "check_first_batch"]

LOSSES = ("cross_entropy", "mse")
#: ``--loss model``: the model's own loss (``loss_fn=None``: ``output.loss``; a causal LM's
#: token cross-entropy, weighted by predicted tokens).
MODEL_LOSS = "model"


def import_object(spec: str, option: str) -> Any:
    """``pkg.module:name`` (or ``path/to/file.py:name``) -> the object; errors name the option."""
    if not isinstance(spec, str) or ":" not in spec:
        raise HesslabError(f"{option}: expected 'pkg.module:name' or 'path/to/file.py:name', got {spec!r}")
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise HesslabError(f"{option}: expected 'pkg.module:name' or 'path/to/file.py:name', got {spec!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise HesslabError(f"{option}: no such file {module_name!r} (from {spec!r})")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except HesslabError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's input
        raise HesslabError(f"{option}: cannot import module {module_name!r} from {spec!r}: "
                           f"{type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise HesslabError(f"{option}: module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str) -> Any:
    from torch import nn

    obj = import_object(spec, "--model")
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise HesslabError(f"--model: {spec!r} is neither a torch.nn.Module nor a factory returning one "
                           f"(got {type(obj).__name__})")
    try:
        model = obj()
    except Exception as exc:  # noqa: BLE001
        raise HesslabError(f"--model: calling the factory {spec!r}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise HesslabError(f"--model: the factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_checkpoint(model: Any, path: str) -> None:
    import torch

    p = Path(path)
    if not p.is_file():
        raise HesslabError(f"--checkpoint: no such file {path!r}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise HesslabError(f"--checkpoint: cannot read {path!r} with torch.load(weights_only=True): "
                           f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HesslabError(f"--checkpoint: {path!r} holds no state_dict (a dict of tensors, as saved by "
                           "torch.save(model.state_dict(), path)), nor one under 'state_dict' or 'model_state_dict'")
    own = set(model.state_dict())
    if own and not (own & set(state)) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel/DDP
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().replace("\n\t", " ").replace("\n", " ")
        raise HesslabError(f"--checkpoint: {path!r} does not match the model from --model: {msg[:900]}") from exc


def default_loss(data: Any) -> str:
    """``--loss`` when not given: ``model`` for dict batches that carry ``labels`` (the
    model computes its own loss), ``cross_entropy`` otherwise."""
    from collections.abc import Mapping

    from hesslab.linops import is_single_batch

    first = data if is_single_batch(data) else data[0]
    return MODEL_LOSS if isinstance(first, Mapping) and "labels" in first else "cross_entropy"


def load_loss(spec: str) -> tuple[Any, str]:
    """``--loss`` -> ``(loss_fn, name)``; ``loss_fn`` is None for ``model`` (the model's own loss)."""
    from torch import nn

    if spec == MODEL_LOSS:
        return None, MODEL_LOSS
    if spec == "cross_entropy":
        return nn.CrossEntropyLoss(), "cross_entropy"
    if spec == "mse":
        return nn.MSELoss(), "mse"
    if ":" not in spec:
        raise HesslabError(f"--loss: unknown loss {spec!r}; expected one of {', '.join(LOSSES)}, "
                           f"{MODEL_LOSS} (the model's own loss) or 'pkg.module:fn' "
                           "(a callable loss_fn(output, targets) returning the batch-mean loss)")
    obj = import_object(spec, "--loss")
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise HesslabError(f"--loss: cannot instantiate {spec!r}(): {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise HesslabError(f"--loss: {spec!r} is not callable (got {type(obj).__name__}); pass a function "
                           "loss_fn(output, targets) -> scalar mean loss")
    return obj, spec


def _move(x: Any, device: Any) -> Any:
    from collections.abc import Mapping

    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping) and not isinstance(x, dict) and callable(getattr(x, "to", None)):
        return x.to(device)  # a transformers BatchEncoding keeps its type
    if isinstance(x, Mapping):
        return {k: _move(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_move(v, device) for v in x)
    return x


def load_data(spec: str, device: Any, max_batches: int | None) -> tuple[Any, dict[str, Any]]:
    """The first ``max_batches`` batches from the loader factory, moved to ``device`` (they
    are held in memory; ``(inputs, targets)`` pairs or dict batches, passed on as they
    are): ``(data, used)`` with ``used = {"batches": taken, "samples": N,
    "batches_in_loader": len(loader) or None, "truncated": whether batches were left out}``."""
    from torch import Tensor

    from hesslab.linops import is_single_batch

    from collections.abc import Mapping

    obj = import_object(spec, "--data")
    if callable(obj) and not hasattr(obj, "__iter__"):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise HesslabError(f"--data: calling the loader factory {spec!r}() failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    if is_single_batch(obj):
        batch = _move(obj if isinstance(obj, Mapping) else tuple(obj), device)
        return batch, {"batches": 1, "samples": _num_samples(batch), "batches_in_loader": 1, "truncated": False}
    if isinstance(obj, (Tensor, str, bytes)) or not hasattr(obj, "__iter__"):
        raise HesslabError(f"--data: {spec!r} gave {type(obj).__name__}; expected a DataLoader, a list of "
                           "(inputs, targets) batches or of dict batches (model(**batch)), or one such batch")
    batches, truncated = [], False
    try:
        for i, batch in enumerate(obj):
            if max_batches is not None and i >= max_batches:
                truncated = True
                break
            if isinstance(batch, Mapping):  # {"input_ids": ..., "labels": ...}: model(**batch)
                batches.append(_move(batch, device))
                continue
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise HesslabError(f"--data: batch {i} from {spec!r} is a {type(batch).__name__}"
                                   f"{' of length ' + str(len(batch)) if hasattr(batch, '__len__') else ''}; "
                                   "expected an (inputs, targets) pair or a dict batch (model(**batch))")
            batches.append(_move(tuple(batch), device))
    except HesslabError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise HesslabError(f"--data: iterating over {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not batches:
        raise HesslabError(f"--data: {spec!r} yielded no batch")
    try:
        in_loader = int(len(obj))
    except Exception:  # noqa: BLE001 - an iterable without a length
        in_loader = None
    used = {"batches": len(batches), "samples": sum(_num_samples(b) for b in batches),
            "batches_in_loader": in_loader, "truncated": truncated}
    return (batches[0] if len(batches) == 1 else batches), used


def _num_samples(batch: Any) -> int:
    """The samples of one batch: the leading size of its targets (or inputs); of a dict
    batch, of its ``labels`` (or its first tensor)."""
    from collections.abc import Mapping

    import torch

    parts = ([batch.get("labels")] + list(batch.values())) if isinstance(batch, Mapping) else [batch[1], batch[0]]
    for part in parts:
        if isinstance(part, torch.Tensor) and part.dim() >= 1:
            return int(part.shape[0])
    return 0


def _describe(x: Any) -> str:
    import torch

    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in x) + ")"
    return type(x).__name__


def _first_batch(data: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of the first batch; a dict batch is all inputs (``model(**batch)``)
    and its ``labels`` are the targets."""
    from collections.abc import Mapping

    from hesslab.linops import is_single_batch

    first = data if is_single_batch(data) else data[0]
    if isinstance(first, Mapping):
        if "labels" not in first:
            keys = ", ".join(map(repr, first)) or "none"
            raise HesslabError(f"--data: the first batch is a dict without 'labels' (keys: {keys}); a dict batch "
                               "is passed as model(**batch) and its labels are the targets: add batch['labels'] "
                               "(for a causal language model, labels = input_ids), or yield (inputs, targets) pairs")
        return first, first["labels"]
    return first


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__


def _model_loss(output: Any) -> Any:
    """The loss a model's output carries (``.loss`` or ``["loss"]``), or None."""
    from collections.abc import Mapping

    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    return loss


def _logits(output: Any) -> Any:
    """The tensor the loss is taken of: the output itself, or its ``logits``."""
    from collections.abc import Mapping

    import torch

    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    return logits


def check_first_batch(model: Any, loss_fn: Any, data: Any) -> int:
    """Run the model and the loss on the first batch; errors name --data or --loss.

    ``loss_fn=None`` (``--loss model``): the model's output must carry a loss. Returns
    the size of the model's last output dimension (the number of classes, the vocabulary)."""
    import torch

    from hesslab.linops import call_model

    inputs, targets = _first_batch(data)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                output = call_model(model, inputs)
            except Exception as exc:  # noqa: BLE001
                raise HesslabError(f"--data: the model from --model fails on the first batch (inputs "
                                   f"{_describe(inputs)}): {type(exc).__name__}: {_first_line(exc)}. Check that "
                                   "the loader yields inputs of the shape and dtype the model expects.") from exc
            if loss_fn is None:
                loss = _model_loss(output)
                if loss is None:
                    raise HesslabError(f"--loss model: the model's output on the first batch carries no loss "
                                       f"(no .loss or ['loss'] in {type(output).__name__}); pass the labels in the "
                                       "batch, or give --loss cross_entropy, mse or pkg.module:fn")
            else:
                try:
                    loss = loss_fn(output, targets)
                except Exception as exc:  # noqa: BLE001
                    raise HesslabError(f"--loss: the loss fails on the model's output {_describe(output)} and the "
                                       f"targets {_describe(targets)} of the first batch from --data: "
                                       f"{type(exc).__name__}: {_first_line(exc)}") from exc
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise HesslabError(f"--loss: must return a scalar tensor (the batch-mean loss), got "
                                   f"{_describe(loss)}")
    finally:
        model.train(training)
    logits = _logits(output)
    return int(logits.shape[-1]) if isinstance(logits, torch.Tensor) and logits.dim() >= 1 else 0
