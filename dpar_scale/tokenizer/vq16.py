"""LlamaGen's VQ-16 image tokenizer (256px -> 16x16 codes from a 16,384-entry codebook).

This is our own implementation of the architecture published in FoundationVision/LlamaGen
(tokenizer/tokenizer_image/vq_model.py, config "VQ-16"). Module and parameter names mirror
theirs exactly so that their released checkpoint ``vq_ds16_c2i.pt`` loads with ``strict=True``.
Only inference is implemented: no losses, no codebook-usage tracking, no training behaviour.
"""

from __future__ import annotations

import os
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpar_scale.errors import MissingFileError

CODEBOOK_SIZE = 16384
CODEBOOK_DIM = 8
Z_CHANNELS = 256
BASE_CHANNELS = 128
CH_MULT = (1, 1, 2, 2, 4)
NUM_RES_BLOCKS = 2

# LlamaGen's quantiser keeps a training-time ring buffer of recently used code indices
# (65,536 floats) in its state dict. It carries no weights, so we drop it on load and write
# zeros on save, which keeps our files loadable by their module.
_USAGE_BUFFER_KEY = "quantize.codebook_used"
_USAGE_BUFFER_LEN = 65536

# Keys under which LlamaGen's scripts look for the weights; "model" is what their sampling
# and evaluation scripts read from vq_ds16_c2i.pt, the others come from their training/demo code.
_WEIGHT_KEYS = ("model", "ema", "state_dict")

_DOWNLOAD_HINT = (
    "download it from https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt "
    "(listed in the FoundationVision/LlamaGen README) and pass its local path"
)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # A 1x1 projection on the skip path only where the channel count changes.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]: one head whose width is the full channel count,
        # so SDPA's default 1/sqrt(C) scaling matches the original formulation.
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right/bottom only: the trained weights expect this asymmetric padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(in_ch: int, out_ch: int, n_res: int, with_attn: bool) -> nn.Module:
    """One resolution level; a bare Module so keys read ``conv_blocks.<i>.res.<j>...``."""
    level = nn.Module()
    level.res = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch) for j in range(n_res))
    # Attention follows every res block, but only at the lowest resolution.
    level.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(n_res if with_attn else 0))
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for j, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


def _mid(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        last = len(CH_MULT) - 1
        self.conv_in = nn.Conv2d(3, BASE_CHANNELS, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        in_ch = BASE_CHANNELS
        for i, mult in enumerate(CH_MULT):
            out_ch = BASE_CHANNELS * mult
            level = _level(in_ch, out_ch, NUM_RES_BLOCKS, with_attn=i == last)
            if i != last:
                level.downsample = Downsample(out_ch)
            self.conv_blocks.append(level)
            in_ch = out_ch
        self.mid = _mid(in_ch)
        self.norm_out = _norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, Z_CHANNELS, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        in_ch = BASE_CHANNELS * CH_MULT[-1]
        self.conv_in = nn.Conv2d(Z_CHANNELS, in_ch, 3, padding=1)
        self.mid = _mid(in_ch)
        # Stored lowest resolution first (index 0 is the 4x-channel level), as in LlamaGen;
        # the decoder uses one more res block per level than the encoder.
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(reversed(CH_MULT)):
            out_ch = BASE_CHANNELS * mult
            level = _level(in_ch, out_ch, NUM_RES_BLOCKS + 1, with_attn=i == 0)
            if i != len(CH_MULT) - 1:
                level.upsample = Upsample(out_ch)
            self.conv_blocks.append(level)
            in_ch = out_ch
        self.norm_out = _norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Holds the codebook; entries are l2-normalised at use, exactly as LlamaGen does."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(CODEBOOK_SIZE, CODEBOOK_DIM)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices [B, h, w] of the nearest normalised code for features z [B, D, h, w]."""
        b, _, h, w = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, CODEBOOK_DIM), p=2, dim=-1)
        codes = self.codebook()
        # Both sides are unit vectors, so the smallest l2 distance is the largest dot product.
        # Chunking bounds the [N, 16384] score matrix for large batches.
        idx = torch.cat([(chunk @ codes.T).argmax(dim=1) for chunk in flat.split(4096)])
        return idx.view(b, h, w)


class VQ16Tokenizer(nn.Module):
    """Frozen image tokenizer: images in [-1, 1] <-> LongTensor code grids at 1/16 resolution."""

    vocab_size = CODEBOOK_SIZE
    downsample = 16
    name = "llamagen-vq16"

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.quantize = VectorQuantizer()
        self.quant_conv = nn.Conv2d(Z_CHANNELS, CODEBOOK_DIM, 1)
        self.post_quant_conv = nn.Conv2d(CODEBOOK_DIM, Z_CHANNELS, 1)
        self.eval()  # inference-only; no layer here behaves differently in train mode anyway

    def pre_quant(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous features [B, 8, H/16, W/16] that the quantiser rounds to codes."""
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not divisible by {self.downsample}")
        return self.quantize.nearest(self.pre_quant(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 3 or codes.is_floating_point():
            raise ValueError(f"expected integer codes of shape [B, h, w], got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise ValueError(f"codes must lie in [0, {self.vocab_size}), got [{codes.min()}, {codes.max()}]")
        z = self.quantize.codebook()[codes.long()].permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)


def save_llamagen_format(model: VQ16Tokenizer, path: str | os.PathLike) -> None:
    """Write ``{"model": state_dict}``, the layout of LlamaGen's released checkpoint."""
    state = dict(model.state_dict())
    state[_USAGE_BUFFER_KEY] = torch.zeros(_USAGE_BUFFER_LEN)
    torch.save({"model": state}, path)


def _first(items, n: int = 5) -> str:
    items = list(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(x) for x in items[:n]) + more


def load_llamagen_vq16(path: str | os.PathLike, device: str | torch.device = "cpu") -> VQ16Tokenizer:
    """Build the tokenizer from LlamaGen's ``vq_ds16_c2i.pt`` (or a file in the same layout)."""
    if not os.path.isfile(path):
        raise MissingFileError(
            f"LlamaGen VQ-16 tokenizer checkpoint not found at {str(path)!r}. This is LlamaGen's "
            f"vq_ds16_c2i.pt (16x-downsampling VQ tokenizer, 16,384 codes); nothing is downloaded "
            f"automatically: {_DOWNLOAD_HINT}."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{str(path)!r} holds more than tensors, so weights-only loading refused it. If you trust "
            f"the file, load it once with weights_only=False and keep only the weights: "
            f"torch.save({{'model': ckpt['model']}}, new_path). ({err})"
        ) from err

    weight_key = next((k for k in _WEIGHT_KEYS if isinstance(checkpoint, dict) and k in checkpoint), None)
    if weight_key is None:
        found = _first(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{str(path)!r} is not a LlamaGen checkpoint: none of {_WEIGHT_KEYS} at top level (found {found})")
    state = {k: v for k, v in checkpoint[weight_key].items() if k != _USAGE_BUFFER_KEY}

    model = VQ16Tokenizer()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{label}: {_first(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape))
        if items
    ]
    if problems:
        raise ValueError(f"{str(path)!r} is not a LlamaGen VQ-16 checkpoint; " + "; ".join(problems))

    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
