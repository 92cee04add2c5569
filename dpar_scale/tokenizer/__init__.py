"""Image tokenizers: a name -> loader dispatch over local files (nothing is ever downloaded).

Every tokenizer exposes `name`, `vocab_size`, `downsample`, `encode(images [-1,1] [B,3,H,W]) -> LongTensor
[B, H/d, W/d]` and `decode(codes) -> images [-1, 1]`. Heavy modules are imported only when asked for, so
`import dpar_scale.tokenizer` stays cheap and works before optional pieces exist.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from dpar_scale.errors import MissingFileError

if TYPE_CHECKING:  # torch loads with the tokenizer itself, so entry points can list TOKENIZER_NAMES cheaply
    import torch

__all__ = ["TOKENIZER_NAMES", "load_tokenizer", "load_llamagen_vq16", "KMeansTokenizer", "VQ16Tokenizer"]

TOKENIZER_NAMES = ("kmeans", "llamagen-vq16")

_HINTS = {
    "kmeans": "fit one with `python tools/fit_tokenizer.py --images DIR --out PATH`",
    "llamagen-vq16": "download LlamaGen's vq_ds16_c2i.pt yourself (FoundationVision/LlamaGen release) and pass "
                     "its local path; this project never downloads weights",
}


def load_llamagen_vq16(path: str, *args: Any, **kwargs: Any):
    """Lazy re-export of dpar_scale.tokenizer.vq16.load_llamagen_vq16."""
    from .vq16 import load_llamagen_vq16 as _load

    return _load(path, *args, **kwargs)


def load_tokenizer(name: str, path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load tokenizer `name` from the local file `path`, in eval mode on `device`."""
    if name not in TOKENIZER_NAMES:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_NAMES)}")
    if not path or not os.path.isfile(path):
        raise MissingFileError(f"{name} tokenizer file {path!r} not found: {_HINTS[name]}")
    if name == "kmeans":
        from .kmeans import KMeansTokenizer

        tok = KMeansTokenizer.load(path, device)
    else:
        tok = load_llamagen_vq16(path)
    return tok.to(device).eval()


def __getattr__(attr: str):
    # Lazy class access (PEP 562): `from dpar_scale.tokenizer import VQ16Tokenizer` imports vq16 on demand.
    if attr == "KMeansTokenizer":
        from .kmeans import KMeansTokenizer

        return KMeansTokenizer
    if attr == "VQ16Tokenizer":
        from .vq16 import VQ16Tokenizer

        return VQ16Tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
