"""Loading pickled PyTorch files without ever running code stored in them."""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

# Markers of torch's weights-only unpickler refusing a global or a call, as opposed to bytes it cannot parse.
_REFUSED = re.compile(r"GLOBAL|Unsupported global|allowlist|safe_globals|call reduce")
_GLOBAL_NAME = re.compile(r"GLOBAL ([\w.]+)")


class UnsafePickleError(RuntimeError):
    """A pickled file holds Python objects (classes, function calls) that loading it would have to execute.

    Attributes:
        path: the file.
        what: the refused global (e.g. "posix.system") when torch names it, else "".
    """

    def __init__(self, path: str | Path, what: str = ""):
        self.path, self.what = str(path), what
        super().__init__(f"{path} contains Python objects{f' ({what})' if what else ''} that detkit refuses to "
                         "execute; only tensors, numbers, strings and containers of them can be loaded")


def torch_load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`: tensors, numbers, strings and containers only.

    An explicit `weights_only=True` cannot be overridden by torch's environment variables (e.g.
    `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`), so nothing outside this call can make it execute a pickle.

    Raises:
        UnsafePickleError: the file needs a global or a call that the weights-only unpickler refuses.
        pickle.UnpicklingError, RuntimeError, EOFError, ...: as torch raises them for damaged files.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if _REFUSED.search(str(e)):
            name = _GLOBAL_NAME.search(str(e))
            raise UnsafePickleError(path, name.group(1) if name else "") from None
        raise
