"""From generated codes to uint8 images: decode with the tokenizer, optionally resize, clamp and round.

`--resize R` follows the paper's protocol for models trained at 384 px and evaluated at 256 px (LlamaGen's
sampler does the same): bicubic interpolation (`torch.nn.functional.interpolate`, align_corners=False, no
antialiasing) of the float decoder output in [-1, 1], then clamp and round to uint8. Decoding runs in float32
whatever autocast the generation used.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

RESIZE_METHOD = "bicubic (torch.nn.functional.interpolate, align_corners=False, antialias=False) on the float " \
                "decoder output, then clamp to [-1, 1] and round to uint8"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] [B, 3, H, W] -> uint8 [B, H, W, 3]: (x + 1) * 127.5, clamped, rounded to the nearest integer."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode_to_uint8(tokenizer, codes: torch.Tensor, resize: int = 0) -> np.ndarray:
    """codes [B, H, W] -> uint8 [B, H', W', 3]; `resize` > 0 resizes to resize x resize (see the module docstring)."""
    device_type = codes.device.type
    with torch.autocast(device_type, enabled=False):
        images = tokenizer.decode(codes).float()
        if resize:
            images = F.interpolate(images, size=(resize, resize), mode="bicubic", align_corners=False)
    return to_uint8(images)
