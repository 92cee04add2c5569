"""Embedded tokenizer: k-means vector quantisation of non-overlapping RGB pixel blocks.

Why it exists: the real tokenizer (LlamaGen VQ-16) needs a 280 MB checkpoint and a GPU to be practical. This
one is fitted in seconds on CPU from the embedded dataset and gives the whole pipeline (extraction, entropy
model, DPAR, sampling, decoding to pictures) a genuine discrete code space with the same interface:
`encode(images in [-1, 1] [B,3,H,W]) -> LongTensor [B, H/b, W/b]` and `decode(codes) -> images`.

A code is the index of the nearest centroid of one b x b block (b = 4 by default, so 48-dim vectors and a
64x64 image becomes 16x16 codes), vectors laid out channel-major (c, dy, dx).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from dpar_scale.errors import MissingFileError

__all__ = ["KMeansTokenizer", "image_blocks", "fit_kmeans", "psnr", "load_kmeans_tokenizer"]

FORMAT = "dpar-kmeans-vq"
FORMAT_VERSION = "1"


def image_blocks(images: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, H/b, W/b, 3*b*b] block vectors (channel-major inside a block)."""
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    b_, c, h, w = images.shape
    b = block_size
    if h % b or w % b:
        raise ValueError(f"image size {h}x{w} is not divisible by the block size {b}")
    x = images.reshape(b_, c, h // b, b, w // b, b).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b_, h // b, w // b, c * b * b)


def _sq_dists(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    # ||x - c||^2 without the ||x||^2 term, which is constant per row and irrelevant to the argmin.
    return c_sq[None, :] - 2.0 * (x @ c.T)


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid index and squared distance for every row of x, in chunks to bound memory."""
    c_sq = (c * c).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = _sq_dists(xs, c, c_sq)
        m, i = d.min(1)
        idx[s:s + chunk] = i
        dist[s:s + chunk] = (m + (xs * xs).sum(1)).clamp_min_(0)
    return idx, dist


def _nearest_exact(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192, rel_tol: float = 2e-5) -> torch.Tensor:
    """Index of the nearest centroid, independent of batch composition, ties broken by the lowest index.

    float32 matmul distances decide every row whose best centroid wins by more than their rounding error
    (which can depend on how rows are batched); the rare rows with a near-tie are settled with exact float64
    distances. So the codes of an image never change with the batch size or the number of processes.
    """
    c_sq = (c * c).sum(1)
    c64 = c.double()
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = _sq_dists(xs, c, c_sq)
        best, idx = d.min(1)
        # float32 rounding of c_sq - 2 x.c over D=48 terms is below ~3e-6 * (||x||^2 + ||c||^2) even in the
        # worst case; rel_tol leaves a margin of several times that.
        tol = rel_tol * ((xs * xs).sum(1) + c_sq.max()) + 1e-6
        near = (d <= (best + tol)[:, None]).sum(1) > 1
        if bool(near.any()):
            rows = near.nonzero().flatten()
            exact = ((xs[rows].double()[:, None, :] - c64[None]) ** 2).sum(-1)
            idx[rows] = exact.argmin(1)  # argmin returns the first (lowest) index among equal minima
        out[s:s + chunk] = idx
    return out


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with probability ~ D(x)^2."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    centres = torch.empty(k, x.shape[1], dtype=x.dtype)
    centres[0] = x[torch.randint(n, (1,), generator=gen)]
    d2 = (x_sq - 2 * (x @ centres[0]) + centres[0].dot(centres[0])).clamp_min_(0)
    for j in range(1, k):
        total = float(d2.sum())
        if total <= 0.0:  # fewer distinct points than k: remaining centres are duplicates (clusters stay empty)
            pick = torch.randint(n, (1,), generator=gen)
        else:
            pick = torch.multinomial(d2 / total, 1, generator=gen)
        centres[j] = x[pick]
        d2 = torch.minimum(d2, (x_sq - 2 * (x @ centres[j]) + centres[j].dot(centres[j])).clamp_min_(0))
    return centres


def fit_kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0, init_per_code: int = 16,
               tol: float = 1e-3, verbose: bool = False) -> torch.Tensor:
    """Fit k centroids to the rows of x [N, D] (CPU, float32): k-means++ on a subsample, then Lloyd steps.

    Seeding on `init_per_code * k` random rows keeps the k sequential passes cheap; Lloyd then runs on all N
    rows until `iters` steps or a relative MSE improvement below `tol`. Empty clusters are re-seeded with the
    points currently worst served, so every code stays in use when the data allows.
    """
    x = x.detach().to("cpu", torch.float32).contiguous()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"need at least codebook_size={k} vectors to fit, got {n}")
    gen = torch.Generator().manual_seed(seed)
    init_n = init_per_code * k
    sub = x[torch.randperm(n, generator=gen)[:init_n]] if n > init_n else x
    c = _kmeans_pp(sub, k, gen)
    prev_mse = None
    for it in range(iters):
        idx, dist = _assign(x, c)
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, idx, x.double())
        counts = torch.bincount(idx, minlength=k)
        nonempty = counts > 0
        c = c.clone()
        c[nonempty] = (sums[nonempty] / counts[nonempty, None]).float()
        empty = (~nonempty).nonzero().flatten()
        if len(empty):
            worst = dist.argsort(descending=True)[: len(empty)]
            c[empty] = x[worst]
        mse = float(dist.mean()) / x.shape[1]
        if verbose:
            print(f"  kmeans iter {it + 1}/{iters}: mse/dim {mse:.5f}, empty {len(empty)}")
        if prev_mse is not None and len(empty) == 0 and prev_mse - mse <= tol * prev_mse:
            break
        prev_mse = mse
    return c


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. the usual PSNR on [0, 1] images)."""
    mse = float(((a.double() - b.double()) ** 2).mean()) / 4.0
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()


class KMeansTokenizer(nn.Module):
    """Nearest-centroid quantiser of b x b RGB blocks; `downsample` = b, `vocab_size` = codebook size."""

    name = "kmeans"

    def __init__(self, codebook: torch.Tensor, block_size: int = 4, channels: int = 3,
                 metadata: dict[str, str] | None = None):
        super().__init__()
        if codebook.dim() != 2 or codebook.shape[1] != channels * block_size * block_size:
            raise ValueError(f"codebook must be [K, {channels * block_size ** 2}] for {block_size}x{block_size}"
                             f" blocks of {channels} channels, got {tuple(codebook.shape)}")
        self.register_buffer("codebook", codebook.detach().float().clone())
        self.block_size = block_size
        self.channels = channels
        self.metadata = dict(metadata or {})

    @property
    def vocab_size(self) -> int:
        return self.codebook.shape[0]

    codebook_size = vocab_size

    @property
    def downsample(self) -> int:
        return self.block_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [-1, 1] [B, 3, H, W] -> codes LongTensor [B, H/b, W/b] (index of the nearest centroid)."""
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected images [B, {self.channels}, H, W], got {tuple(images.shape)}")
        blocks = image_blocks(images.to(self.codebook.device, torch.float32), self.block_size)
        b, h, w, d = blocks.shape
        return _nearest_exact(blocks.reshape(-1, d), self.codebook).reshape(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] (or [B, h*w] for a square grid) -> images [B, 3, h*b, w*b] in [-1, 1]."""
        if codes.dim() == 2:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"flat codes of length {codes.shape[1]} are not a square grid; pass [B, h, w]")
            codes = codes.reshape(codes.shape[0], side, side)
        if codes.dim() != 3:
            raise ValueError(f"expected codes [B, h, w], got shape {tuple(codes.shape)}")
        codes = codes.to(self.codebook.device).long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(f"codes out of range [0, {self.vocab_size})")
        b, h, w = codes.shape
        bs, c = self.block_size, self.channels
        x = self.codebook[codes].reshape(b, h, w, c, bs, bs).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h * bs, w * bs).clamp(-1.0, 1.0)

    @classmethod
    def fit(cls, images: torch.Tensor, codebook_size: int = 512, block_size: int = 4, iters: int = 10,
            seed: int = 0, max_blocks: int = 200_000, verbose: bool = False) -> "KMeansTokenizer":
        """Fit on images [N, 3, H, W] in [-1, 1], using at most `max_blocks` randomly sampled blocks."""
        blocks = image_blocks(images, block_size).reshape(-1, images.shape[1] * block_size ** 2)
        if blocks.shape[0] > max_blocks:
            gen = torch.Generator().manual_seed(seed + 1)
            blocks = blocks[torch.randperm(blocks.shape[0], generator=gen)[:max_blocks]]
        cb = fit_kmeans(blocks, codebook_size, iters=iters, seed=seed, verbose=verbose)
        meta = {"seed": str(seed), "iters": str(iters), "num_fit_blocks": str(blocks.shape[0])}
        return cls(cb, block_size=block_size, channels=images.shape[1], metadata=meta)

    def save(self, path: str, extra_metadata: dict[str, Any] | None = None) -> None:
        """Write a safetensors file (tensor `codebook`, metadata: format, codebook/block size); atomic."""
        from safetensors.torch import save_file

        meta = {**self.metadata, **{k: str(v) for k, v in (extra_metadata or {}).items()}}
        meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, "codebook_size": str(self.vocab_size),
                     "block_size": str(self.block_size), "channels": str(self.channels)})
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        save_file({"codebook": self.codebook.detach().cpu().contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "KMeansTokenizer":
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise MissingFileError(f"k-means tokenizer file {path!r} not found; fit one with "
                                    f"`python tools/fit_tokenizer.py --images DIR --out {path}`")
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path!r} is not a k-means tokenizer file (metadata format="
                                 f"{meta.get('format')!r}, expected {FORMAT!r})")
            codebook = f.get_tensor("codebook")
        block, ch = int(meta["block_size"]), int(meta.get("channels", "3"))
        if int(meta["codebook_size"]) != codebook.shape[0]:
            raise ValueError(f"{path!r}: metadata codebook_size {meta['codebook_size']} != tensor rows "
                             f"{codebook.shape[0]}")
        keep = {k: v for k, v in meta.items() if k not in ("format", "format_version", "codebook_size",
                                                           "block_size", "channels")}
        return cls(codebook, block_size=block, channels=ch, metadata=keep).to(device).eval()


def load_kmeans_tokenizer(path: str, device: str | torch.device = "cpu") -> KMeansTokenizer:
    return KMeansTokenizer.load(path, device)
