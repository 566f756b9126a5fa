"""Base for result dataclasses: ``to_dict()``, ``save()`` and ``load()``.

Every solver and analysis returns a dataclass deriving from :class:`Result`. Arrays
(numpy or torch) are stored as numpy arrays; ``save`` writes JSON (arrays as lists)
or NPZ (arrays kept binary, scalars in a JSON header) by the file's suffix, and
``load`` reads either back into the same class.

Every subclass registers itself by its class name when it is defined
(:meth:`Result.__init_subclass__`), so a file that names its type (``{"type":
"EigenResult", ...}``) is read back by :func:`result_class` without importing modules by
name; a module defining results (solvers, analyses, tracking) needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

R = TypeVar("R", bound="Result")

#: Every Result subclass defined so far, by class name (see :meth:`Result.__init_subclass__`).
_REGISTRY: dict[str, type["Result"]] = {}


def _plain(value: Any) -> Any:
    """Convert tensors to numpy and numpy scalars to Python scalars, recursively."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def jsonable(value: Any) -> Any:
    """Plain JSON values (numpy/torch scalars and arrays to Python; NaN/Inf to None), for
    summaries and records that are read as they are rather than loaded back."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Path):
        return str(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return {"__float__": repr(value)}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"]).reshape(value["shape"])
        if "__float__" in value:
            return float(value["__float__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


@dataclasses.dataclass
class Result:
    """Mixin for hesslab's result dataclasses."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register the subclass under its name. A class of another package (or a test)
        with the name of one of hesslab's own does not replace it."""
        super().__init_subclass__(**kwargs)
        known = _REGISTRY.get(cls.__name__)
        if known is None or not _is_own(known) or _is_own(cls):
            _REGISTRY[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        """Fields as a dict of Python scalars, strings and numpy arrays."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> dict[str, Any]:
        """Fields as a JSON-serialisable dict (arrays tagged so :meth:`from_json` restores them)."""
        return {"type": type(self).__name__, **_jsonable(self.to_dict())}

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        data = {k: v for k, v in data.items() if k != "type"}
        return cls(**_from_json(data))

    def save(self, path: str | Path) -> Path:
        """Write to ``path``: ``.npz`` keeps arrays binary, anything else is JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            d = self.to_dict()
            arrays = {k: v for k, v in d.items() if isinstance(v, np.ndarray)}
            rest = {k: v for k, v in d.items() if k not in arrays}
            header = json.dumps({"type": type(self).__name__, **_jsonable(rest)})
            np.savez(path, __header__=np.array(header), **arrays)
        else:
            path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = json.loads(str(z["__header__"]))
                data.update({k: z[k] for k in z.files if k != "__header__"})
        else:
            data = json.loads(path.read_text())
        return cls.from_json(data)


def _is_own(cls: type) -> bool:
    return cls.__module__ == "hesslab" or cls.__module__.startswith("hesslab.")


def result_types() -> dict[str, type[Result]]:
    """Every registered result class, by name (those of hesslab's modules imported so far;
    ``import hesslab`` imports all of them)."""
    return dict(_REGISTRY)


def result_class(name: str) -> type[Result] | None:
    """The registered result class called ``name``, or None."""
    return _REGISTRY.get(name)
