"""Class-conditional sampling for the GPT baseline and DPAR, with classifier-free guidance and KV caches.

Both generators draw codes one by one in raster order. Classifier-free guidance runs the conditional and the
unconditional (null class) halves as ONE batch of 2B rows, mixes `u + s·(c - u)`, samples one code per image from
the mixed logits and writes it to both halves. `cfg_scale == 1` is exactly the conditional model, so it runs
the conditional half only.

Randomness is given up front: `uniforms` [B, N] holds one number in [0, 1) per image per code (row b is image b's
own stream, `dpar_scale.sampling.streams.sample_uniforms(seed, sample_ids, N)`), and code k of image b is the
inverse CDF of the filtered distribution (temperature, then top-k, then top-p) at uniforms[b, k]. The numbers an
image reads therefore depend neither on the logits nor on the other images of the batch, so the cached and the
uncached paths, which compute the same logits up to float rounding, pick the same codes, and an image's stream
is the same in any batch.

DPAR decides its patch boundaries while it generates, with the rule it was trained with: the unconditional
entropy model runs alongside (KV-cached) on the sampled codes; after code k is sampled it yields e[k+1], and
`dpar_scale.patching.rule.patch_starts` on the entropies known so far says whether code k+1 opens a patch (reference
alignment reads e[k], BLT e[k+1]; both are known then). If it does, the patch that code k closes is summarised by
the encoder and the global model takes one step for that image; the decoder then predicts code k+1 from the
global output of patch k+1's predecessors. Both CFG halves share the boundaries (the entropy model is
unconditional and sees the same codes).

Text models take `text=(text_ids, text_lengths, eos_id)`: the B prompts ragged (dpar_scale.data.loader.ragged_text)
and the text tokenizer's eos; the unconditional half of CFG is the empty caption [eos] for every image. The prompts
are prefilled into the KV caches once (their lengths may differ; the padding is masked), and `labels` then only
sets B.

`use_cache=False` recomputes the whole prefix at every code with the training `forward` (the authors' way, and
the reference the tests compare against): GPT on the codes so far, DPAR with the prefix layout.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dpar_scale.patching.entropy import entropy_from_logits
from dpar_scale.patching.layout import PatchLayout
from dpar_scale.patching.rule import patch_rule, starts_to_lengths

__all__ = ["GenerationStats", "sample_logits", "guide", "generate_gpt", "generate_dpar", "gpt_logits_cached",
           "dpar_logits_cached", "entropies_cached"]


@dataclass
class GenerationStats:
    """Work done by one generation call, counted in (row, position) pairs pushed through each stack.

    Rows include both CFG halves. Cached: every position once. Uncached: the whole prefix at every code.
    """

    rows: int = 0
    codes: int = 0  # codes generated per image
    token_positions: int = 0  # GPT
    entropy_positions: int = 0
    encoder_positions: int = 0
    global_positions: int = 0
    decoder_positions: int = 0
    patches: list = field(default_factory=list)  # DPAR: per image, the number of patches

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "patches"}


# ------------------------------------------------------------------------------------------------- sampling
def guide(logits: torch.Tensor, cfg_scale: float, cfg: bool) -> torch.Tensor:
    """[2B, V] (cond rows, then uncond rows) -> u + s·(c - u) [B, V]; [B, V] passes through when cfg is off."""
    if not cfg:
        return logits.float()
    cond, uncond = logits.float().chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


def sample_logits(logits: torch.Tensor, u: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """One code per row from logits [B, V] and one uniform per row u [B]: temperature, top-k (0 = off), top-p
    (1 = off), then the inverse CDF at u. temperature <= 0 is greedy (argmax; u is not read)."""
    b, v = logits.shape
    if u.shape != (b,):
        raise ValueError(f"sample_logits: need one uniform per row, u [{b}], got {list(u.shape)}")
    u = u.to(device=logits.device, dtype=torch.float32)
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < v:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold more than top_p (the top one always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    target = u.clamp_min(torch.finfo(torch.float32).tiny)[:, None] * cdf[:, -1:]
    return (cdf < target).sum(dim=-1).clamp_max(v - 1)


def _text_rows(text, b: int, cfg: bool, device):
    """(text_ids, text_lengths) of the rows: the prompts, then (CFG) the empty caption [eos] for every image."""
    if text is None:
        return None
    ids, lengths, eos = text
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if lengths.shape != (b,) or int(lengths.min()) < 1 or int(lengths.sum()) != len(ids):
        raise ValueError(f"text: need one caption of >= 1 token (eos last) per image ({b}), ragged: got lengths "
                         f"{lengths.tolist()} for {len(ids)} ids")
    ids = torch.as_tensor(ids, dtype=torch.long).to(device)
    if cfg:
        ids = torch.cat([ids, torch.full((b,), int(eos), dtype=torch.long, device=device)])
        lengths = torch.cat([lengths, torch.ones(b, dtype=torch.long)])
    return ids, lengths


def _check_text(model, text) -> None:
    if getattr(model, "text_conditioned", False) and text is None:
        raise ValueError("this model is text-conditioned: pass text=(text_ids, text_lengths, eos_id) (the prompts, "
                         "e.g. ragged_text(tokenizer, prompts, max_length)[:2] and tokenizer.eos_id)")
    if text is not None and not getattr(model, "text_conditioned", False):
        raise ValueError("text prompts given to a class-conditional model")


def _cfg_labels(model, labels: torch.Tensor, cfg: bool) -> torch.Tensor:
    if not cfg:
        return labels
    return torch.cat([labels, torch.full_like(labels, model.num_classes)])


def _check_uniforms(uniforms: torch.Tensor, b: int, n: int, device) -> torch.Tensor:
    if not isinstance(uniforms, torch.Tensor) or tuple(uniforms.shape) != (b, n):
        got = list(uniforms.shape) if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__
        raise ValueError(f"uniforms: need [{b}, {n}] (one per image per code, e.g. "
                         f"sample_uniforms(seed, sample_ids, {n})), got {got}")
    return uniforms.to(device=device, dtype=torch.float32)


def _check_labels(model, labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("labels: need at least one image")
    if model.num_classes > 0 and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(f"labels must lie in [0, {model.num_classes}) (the model's classes), got "
                         f"{labels.min().item()}..{labels.max().item()}")
    return labels


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval(*models):
    """Eval mode (no dropout, no class dropout) for the duration of a generation, then the previous modes."""
    models = [m for m in models if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _bar(total: int, progress: bool, desc: str):
    return tqdm(total=total, desc=desc, unit="code", disable=not progress, leave=False)


# ----------------------------------------------------------------------------------------------------- GPT
@torch.no_grad()
def generate_gpt(model, labels: torch.Tensor, *, uniforms: torch.Tensor, cfg_scale: float = 1.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, use_cache: bool = True,
                 progress: bool = False, stats: GenerationStats | None = None, text=None) -> torch.Tensor:
    """Codes [B, N] (raster order) from the GPT baseline for class `labels` [B]; `uniforms` [B, N] are the
    images' random streams (see the module docstring).

    For the unconditional entropy model (num_classes == 0) `labels` only sets B and guidance is off.
    """
    device = _device(model)
    labels = _check_labels(model, labels).to(device)
    b, n = labels.shape[0], model.grid[0] * model.grid[1]
    uniforms = _check_uniforms(uniforms, b, n, device)
    _check_text(model, text)
    cfg = model.conditional and cfg_scale != 1.0
    cond = _cfg_labels(model, labels, cfg) if model.num_classes > 0 and text is None else None
    rows = 2 * b if cfg else b
    words = _text_rows(text, b, cfg, device)
    width = int(words[1].max()) if words is not None else 0
    prompt = dict(text_ids=words[0], text_lengths=words[1]) if words is not None else {}
    codes = torch.zeros(b, n, dtype=torch.long, device=device)
    stats = stats if stats is not None else GenerationStats()
    stats.rows, stats.codes = rows, n
    draw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    cache = (model.new_cache(rows, text_width=width) if width else model.new_cache(rows)) if use_cache else None
    with _eval(model), _bar(n, progress, "gpt") as bar:
        for k in range(n):
            if use_cache:
                # Input position k: the condition (k = 0: the class, or the prompts prefilled) or code k-1; its
                # output predicts code k.
                prev = None if k == 0 else codes[:, k - 1:k].repeat(rows // b, 1)
                logits = model.step(cache, prev, cond, **(prompt if k == 0 else {}))[:, -1]
            else:
                prefix = torch.cat([codes[:, :k], codes.new_zeros(b, 1)], dim=1).repeat(rows // b, 1)
                logits = model(prefix, cond, **prompt)[:, k]  # the dummy code k is never read for position k
                stats.token_positions += rows * (k + 1)
            codes[:, k] = sample_logits(guide(logits, cfg_scale, cfg), uniforms[:, k], **draw)
            bar.update(1)
    if use_cache:
        stats.token_positions = cache.positions
    return codes


# ---------------------------------------------------------------------------------------------------- DPAR
def _check_entropy_model(model, entropy_model, needs_entropy: bool) -> None:
    if not needs_entropy:
        return
    if entropy_model is None:
        raise ValueError("this patch rule needs the entropy model (only model.patch.mode=static needs none)")
    if getattr(entropy_model, "num_classes", 0) != 0:
        raise ValueError("the entropy model must be the unconditional GPT (num_classes == 0)")
    if tuple(entropy_model.grid) != tuple(model.grid) or entropy_model.vocab_size != model.vocab_size:
        raise ValueError(f"entropy model (grid {entropy_model.grid}, vocab {entropy_model.vocab_size}) does not "
                         f"match DPAR (grid {model.grid}, vocab {model.vocab_size})")


@torch.no_grad()
def generate_dpar(model, entropy_model, labels: torch.Tensor, *, patch_cfg, uniforms: torch.Tensor,
                  cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  use_cache: bool = True,
                  entropy_dtype: torch.dtype = torch.float32, progress: bool = False,
                  stats: GenerationStats | None = None, text=None) -> tuple[torch.Tensor, list[list[int]]]:
    """(codes [B, N], per-image patch lengths) from DPAR for class `labels` [B]; `uniforms` [B, N] are the
    images' random streams (see the module docstring).

    `patch_cfg` (dpar_scale.config.PatchConfig) is the patch rule: the one the model was trained with, or an
    inference-time override of it. `entropy_dtype` rounds
    each entropy before the rule reads it: float16 reproduces training on entropies stored as float16 by
    tools/compute_entropy.py; float32 equals `patch_lengths(code_entropies(entropy_model, codes), ...)`.
    `entropy_model` may be None for mode=static.
    """
    device = _device(model)
    labels = _check_labels(model, labels).to(device)
    b, (h, w) = labels.shape[0], model.grid
    n = h * w
    uniforms = _check_uniforms(uniforms, b, n, device)
    needs_entropy = patch_cfg.mode != "static"
    _check_entropy_model(model, entropy_model, needs_entropy)
    rule = patch_rule(patch_cfg, w)
    _check_text(model, text)
    cfg = cfg_scale != 1.0
    halves = 2 if cfg else 1
    cond = _cfg_labels(model, labels, cfg) if text is None else None
    rows = halves * b
    words = _text_rows(text, b, cfg, device)
    prompt = dict(text_ids=words[0], text_lengths=words[1]) if words is not None else {}
    cond_lengths = words[1].tolist() if words is not None else None
    codes = torch.zeros(b, n, dtype=torch.long, device=device)
    entropy = torch.zeros(b, n, dtype=torch.float32)  # CPU: the rule's input; entries not yet known stay 0
    stats = stats if stats is not None else GenerationStats()
    stats.rows, stats.codes = rows, n
    draw = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    def rounded(e: torch.Tensor) -> torch.Tensor:
        return e.to(entropy_dtype).float().cpu()

    with _eval(model, entropy_model if needs_entropy else None), _bar(n, progress, "dpar") as bar:
        if use_cache:
            cache = model.new_cache(rows, text_width=max(cond_lengths)) if words is not None else model.new_cache(rows)
            if needs_entropy:
                ecache = entropy_model.new_cache(b)
                entropy[:, 0] = rounded(entropy_from_logits(entropy_model.step(ecache, None)[:, -1]))
            logits = model.start(cache, cond, **prompt)
            for k in range(n):
                code = sample_logits(guide(logits, cfg_scale, cfg), uniforms[:, k], **draw)
                codes[:, k] = code
                bar.update(1)
                if k == n - 1:
                    break  # the last code closes the last patch, which nothing reads
                if needs_entropy:  # e[k+1]: the entropy model's prediction of code k+1 from codes <= k
                    elogits = entropy_model.step(ecache, code[:, None])[:, -1]
                    entropy[:, k + 1] = rounded(entropy_from_logits(elogits))
                close = rule(entropy)[:, k + 1]  # code k+1 opens a patch <=> code k closes one
                logits = model.step(cache, code.repeat(halves), close.repeat(halves))
            stats.entropy_positions = ecache.positions if needs_entropy else 0
            stats.encoder_positions = cache.encoder.positions
            stats.global_positions = cache.glob.positions
            stats.decoder_positions = cache.decoder.positions
        else:
            for k in range(n):
                prefix = torch.cat([codes[:, :k], codes.new_zeros(b, 1)], dim=1)  # dummy code k: never read
                if needs_entropy:
                    entropy[:, :k + 1] = rounded(entropy_from_logits(entropy_model(prefix)))
                    stats.entropy_positions += b * (k + 1)
                layout = PatchLayout.from_starts(rule(entropy)[:, :k + 1].repeat(halves, 1), (h, w),
                                                 cond_lengths=cond_lengths).to(device)
                logits = model(prefix.repeat(halves, 1), cond, layout, **prompt)[:, k]
                stats.encoder_positions += rows * (k + 1)
                stats.decoder_positions += rows * (k + 1)
                stats.global_positions += layout.num_global_positions
                codes[:, k] = sample_logits(guide(logits, cfg_scale, cfg), uniforms[:, k], **draw)
                bar.update(1)
    lengths = starts_to_lengths(rule(entropy))
    stats.patches = [len(x) for x in lengths]
    return codes, lengths


# ------------------------------------------------------------------------------- teacher-forced (tests)
@torch.no_grad()
def gpt_logits_cached(model, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """`model(codes, labels)` computed one position at a time through the KV cache: logits [B, N, vocab]."""
    b, n = codes.shape
    cache = model.new_cache(b)
    out = [model.step(cache, None, labels)]
    for k in range(n - 1):
        out.append(model.step(cache, codes[:, k:k + 1]))
    return torch.cat(out, dim=1)


@torch.no_grad()
def entropies_cached(entropy_model, codes: torch.Tensor) -> torch.Tensor:
    """`code_entropies(entropy_model, codes)` through the KV cache."""
    return entropy_from_logits(gpt_logits_cached(entropy_model, codes))


@torch.no_grad()
def dpar_logits_cached(model, codes: torch.Tensor, labels: torch.Tensor | None, layout: PatchLayout):
    """`model(codes, labels, layout)` computed code by code through DPARCache: logits [B, N, vocab] and the
    cache (whose counters say how much work each stage did)."""
    b, n = codes.shape
    starts = torch.zeros(b, n + 1, dtype=torch.bool)
    starts[:, n] = True
    starts[:, :n] = layout.patch_id.cpu().diff(dim=1, prepend=layout.patch_id.new_full((b, 1), -1).cpu()) != 0
    cache = model.new_cache(b)
    out = [model.start(cache, labels)]
    for k in range(n - 1):
        out.append(model.step(cache, codes[:, k], starts[:, k + 1]))
    return torch.stack(out, dim=1), cache
