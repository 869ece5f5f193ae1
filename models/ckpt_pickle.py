"""A restricted unpickler for `.ckpt` files: what checkpoints found in the wild carry, and nothing that runs.

Training-era Stable Diffusion checkpoints pickle more than tensors: a PyTorch Lightning `ModelCheckpoint`
callback (the class itself is a dict key), numpy scalars (`global_step`), bytes (protocol 2 writes them
through `_codecs.encode`). `torch.load(weights_only=True)` refuses those files; `weights_only=False` would
run whatever a pickle names. This module is handed to `torch.load` as its `pickle_module`: torch keeps its
own storage handling (zip or legacy format, mmap) and every other global goes through `find_class` here.

Allowed: tensor and storage rebuilders, `torch.Size`, torch dtypes, `OrderedDict`, a few builtin
containers, the numpy scalar and dtype reconstructors, `_codecs.encode` for latin-1/utf-8 text only, and
`copyreg._reconstructor` for placeholders only. PyTorch Lightning globals become inert placeholder classes
(never imported: instances only keep the state the pickle gives them). Anything else raises
`ForbiddenGlobal` naming the global, before it is ever looked up.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import pickle
import threading
from typing import Any

import numpy
import torch

_LIGHTNING_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
_TEXT_ENCODINGS = frozenset({"latin1", "latin-1", "utf-8", "utf8"})


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist: refused before it is looked up."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"forbidden global {module}.{name}")
        self.global_name = f"{module}.{name}"


class LightningPlaceholder:
    """Stands in for a PyTorch Lightning class: accepts any arguments and state, does nothing with them."""

    original: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args
        self.__dict__["_kwargs"] = kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.original}>"


_placeholders: dict[str, type[LightningPlaceholder]] = {}
_placeholders_lock = threading.Lock()


def placeholder(full_name: str) -> type[LightningPlaceholder]:
    """One placeholder class per Lightning global: a class used as a dict key stays hashable and equal."""
    with _placeholders_lock:
        cls = _placeholders.get(full_name)
        if cls is None:
            short = full_name.rsplit(".", 1)[-1]
            cls = type(short, (LightningPlaceholder,), {"original": full_name, "__module__": __name__})
            _placeholders[full_name] = cls
        return cls


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(str, "latin1"); nothing else is needed.
    if str(encoding).lower() not in _TEXT_ENCODINGS:
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # Protocols 0 and 1 rebuild plain objects this way; only a placeholder may be rebuilt.
    if not (isinstance(cls, type) and issubclass(cls, LightningPlaceholder)) or base is not object:
        raise pickle.UnpicklingError(f"refused copyreg._reconstructor({cls!r}, {base!r})")
    return cls.__new__(cls)


def _numpy_scalar_reconstructor() -> Any:
    core = getattr(numpy, "_core", None) or numpy.core
    return core.multiarray.scalar


_TORCH_DTYPES = {
    name: getattr(torch, name)
    for name in dir(torch)
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("numpy", "dtype"): numpy.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar_reconstructor(),
    ("numpy._core.multiarray", "scalar"): _numpy_scalar_reconstructor(),
    ("_codecs", "encode"): _encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    **{("torch", name): dtype for name, dtype in _TORCH_DTYPES.items()},
}


def allowed_global(module: str, name: str) -> Any:
    """The object a pickle may name as `module.name`, a placeholder for Lightning, or ForbiddenGlobal."""
    found = _ALLOWED.get((module, name))
    if found is not None:
        return found
    if (module + ".").startswith(_LIGHTNING_PREFIXES):
        return placeholder(f"{module}.{name}")
    raise ForbiddenGlobal(module, name)


class Unpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class consults the allowlist only (nothing is ever imported)."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (__builtin__, copy_reg) map as the stock unpickler maps them; then the allowlist.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        return allowed_global(module, name)


def load(file: Any, **kwargs: Any) -> Any:
    """pickle.load through the restricted Unpickler (torch's legacy format reads its headers with it)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    import io

    return Unpickler(io.BytesIO(data), **kwargs).load()


# torch.load only needs Unpickler and load; the rest of the pickle API is there for completeness.
Pickler = pickle.Pickler
dump = pickle.dump
dumps = pickle.dumps
UnpicklingError = pickle.UnpicklingError
