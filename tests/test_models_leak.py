"""No leak: the prediction of code t may depend only on codes < t and the class.

For every model kind and several patch layouts we perturb code t of one image (for *every* t, which covers t = 0,
N-1 and the first / last code of every patch) and check that
  * logits at positions <= t of that image do not move (beyond float32 rounding: tests/tolerances.py),
  * some logit at a position > t does move, by far more than rounding (unless t = N-1), so the test would see a
    leak-free but dead model,
  * no logit of the other image in the batch moves (batch independence through the packed global sequence).
Class changes must move the logits of gpt / dpar and must not move those of the entropy model. Running on a prefix
of k codes (layout cut at k, as during generation) must reproduce the full run's logits at positions < k.
DPAR is checked in its structures: the global state injected before every decoder layer or once before the
first (model.dpar.decoder_injection), with or without an FFN after the patch cross-attention.
"""
import pytest
import torch
from torch import nn

from dpar_scale.patching.layout import PatchLayout, static_lengths
from dpar_scale.models import DPAR, GPT
from dpar_scale.patching.rule import patch_lengths
from tolerances import abs_tol, assert_close, magnitude, model_chain

GRID = (4, 6)  # N = 24 codes, rows of 6: small, but with several rows for row-reset / row-end patches
N = GRID[0] * GRID[1]
VOCAB, CLASSES = 37, 5
COMMON = dict(dim=32, n_heads=2, vocab_size=VOCAB, grid=GRID, multiple_of=16, dropout=0.1, class_dropout=0.5)




def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    # The LlamaGen init zeroes the output head (all logits 0): use weights large enough that every path shows.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))
    return model.eval()


# (decoder_injection, cross_attn_ffn): the authors' structure (the default) and today's legacy one
AUTHORS, LEGACY = ("every", False), ("first", True)


def make_model(kind: str, global_rope: str = "dynamic", variant: tuple[str, bool] = AUTHORS):
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(n_layers=3, num_classes=CLASSES, **COMMON)
    elif kind == "entropy":
        model = GPT(n_layers=3, num_classes=0, **COMMON)
    else:
        injection, ffn = variant
        model = DPAR(n_encoder_layers=1, n_global_layers=2, n_decoder_layers=2, num_classes=CLASSES,
                     global_rope=global_rope, decoder_injection=injection, cross_attn_ffn=ffn, **COMMON)
    return randomize(model)


def random_lengths(gen: torch.Generator, pmax: int, row_reset: bool = True) -> list[int]:
    """Codes 0 and 1 start patches, row starts too (row_reset), others at random; runs split at pmax."""
    starts = [k for k in range(N) if k < 2 or (row_reset and k % GRID[1] == 0)
              or torch.rand((), generator=gen).item() < 0.3]
    lengths = []
    for a, b in zip(starts, starts[1:] + [N]):
        run = b - a
        lengths += [pmax] * (run // pmax) + ([run % pmax] if run % pmax else [])
    return lengths


def layouts():
    gen = torch.Generator().manual_seed(1)
    entropy = torch.rand(2, N, generator=gen) * 9.7
    from_patcher = patch_lengths(entropy, width=GRID[1], threshold=6.0, max_patch_length=4)
    cases = {
        "pmax1": [[1] * N, [1] * N],
        "pmax4-random": [random_lengths(gen, 4), random_lengths(gen, 4)],
        "row-ends": [static_lengths(GRID, 3), static_lengths(GRID, 2)],  # patches end exactly at col W-1
        "single-first+long": [[1, 5] + static_lengths(GRID, 6)[1:], [1, 1, 4] + [6] * 3],
        "cross-rows": [random_lengths(gen, 8, row_reset=False), [1] + [23]],
        "patcher": from_patcher,
    }
    return cases


LAYOUTS = layouts()
MODELS = [("gpt", "dynamic", AUTHORS), ("entropy", "dynamic", AUTHORS), ("dpar", "dynamic", AUTHORS),
          ("dpar", "1d", AUTHORS), ("dpar", "dynamic", LEGACY)]
# Token models ignore the layout: one layout is enough for them; DPAR gets every layout in the authors' and the
# legacy structure, and the two other combinations of the options get the layouts with the longest patches.
CASES = [(k, r, v, name) for k, r, v in MODELS for name in (LAYOUTS if k == "dpar" else ["pmax4-random"])]
CASES += [("dpar", "dynamic", v, name) for v in (("every", True), ("first", False))
          for name in ("single-first+long", "patcher")]


def case_id(kind, rope, variant, name):
    return f"{kind}-{rope}-{name}" + (f"-{variant[0]}{'-ffn' if variant[1] else ''}" if kind == "dpar" else "")


def perturb(codes: torch.Tensor, b: int, t: int) -> torch.Tensor:
    out = codes.clone()
    out[b, t] = (out[b, t] + 1 + (7 * t) % (VOCAB - 1)) % VOCAB
    return out


@pytest.mark.parametrize("kind,rope,variant,layout_name", CASES, ids=[case_id(*c) for c in CASES])
def test_no_leak_every_position(kind, rope, variant, layout_name):
    model = make_model(kind, rope, variant)
    layout = PatchLayout.from_lengths(LAYOUTS[layout_name], GRID, pad_to_multiple=4)
    torch.manual_seed(2)
    codes = torch.randint(0, VOCAB, (2, N))
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        base = model(codes, labels, layout)
        # Same shapes in both runs: positions that do not depend on code t can only move by rounding (kernels whose
        # result depends on memory alignment); a leak moves them by a fraction of the logits' scale.
        tol = abs_tol(magnitude(base), **model_chain(model, N))
        for b in (0, 1):
            other = 1 - b
            for t in range(N):
                out = model(perturb(codes, b, t), labels, layout)
                prefix = (out[b, : t + 1] - base[b, : t + 1]).abs().max().item()
                assert prefix <= tol, f"{kind}/{layout_name}: code {t} of image {b} moved logits <= t by {prefix}"
                if t < N - 1:
                    later = (out[b, t + 1:] - base[b, t + 1:]).abs().max().item()
                    assert later > 100 * tol, f"{kind}/{layout_name}: code {t} does not influence later logits"
                cross = (out[other] - base[other]).abs().max().item()
                assert cross <= tol, f"{kind}/{layout_name}: image {b}'s code {t} moved image {other} by {cross}"


@pytest.mark.parametrize("kind,variant", [("gpt", AUTHORS), ("entropy", AUTHORS), ("dpar", AUTHORS),
                                          ("dpar", LEGACY)])
def test_class_conditioning(kind, variant):
    model = make_model(kind, variant=variant)
    layout = PatchLayout.from_lengths(LAYOUTS["pmax4-random"], GRID)
    torch.manual_seed(3)
    codes = torch.randint(0, VOCAB, (2, N))
    with torch.no_grad():
        a = model(codes, torch.tensor([1, 2]), layout)
        b = model(codes, torch.tensor([4, 2]), layout)
        null = model(codes, None, layout)
    if kind == "entropy":
        assert torch.equal(a, b) and torch.equal(a, null), "the entropy model must ignore labels"
    else:
        assert (a[0] - b[0]).abs().min(dim=-1).values.gt(0).all(), "class must move the logits of every position"
        assert torch.equal(a[1], b[1]), "image 0's class moved image 1"
        assert not torch.equal(a, null)


def test_class_dropout_only_in_training():
    model = make_model("dpar")
    layout = PatchLayout.from_lengths(LAYOUTS["pmax4-random"], GRID)
    codes, labels = torch.randint(0, VOCAB, (2, N)), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(codes, labels, layout), model(codes, labels, layout))  # eval: deterministic
        model.train()
        for m in model.modules():  # keep residual dropout off, class dropout (p=0.5) on
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        outs = {tuple(model(codes, labels, layout)[:, 0, 0].tolist()) for _ in range(20)}
    assert len(outs) > 1, "class dropout never fired in training mode"


def test_logits_shape_and_dtype():
    # Logits are [B, N, vocab] for every kind and `logits[:, t]` is trained against codes[:, t].
    layout = PatchLayout.static(2, GRID, 2)
    codes = torch.randint(0, VOCAB, (2, N))
    for kind in ("gpt", "entropy", "dpar"):
        out = make_model(kind)(codes, torch.tensor([0, 1]), layout)
        assert out.shape == (2, N, VOCAB) and out.dtype == torch.float32


@pytest.mark.parametrize("kind,rope,variant,layout_name", CASES, ids=[case_id(*c) for c in CASES])
def test_prefix_equals_full(kind, rope, variant, layout_name):
    # Running on the first k codes only (layout cut at k, the last patch possibly unfinished, as during
    # generation) must reproduce the full run's logits at positions < k: nothing at >= k was ever used.
    model = make_model(kind, rope, variant)
    layout = PatchLayout.from_lengths(LAYOUTS[layout_name], GRID, pad_to_multiple=4)
    torch.manual_seed(4)
    codes, labels = torch.randint(0, VOCAB, (2, N)), torch.tensor([2, 0])
    with torch.no_grad():
        full = model(codes, labels, layout)
        for k in (1, 2, 5, 7, 12, 17, N - 1):
            part = model(codes[:, :k], labels, layout.prefix(k))
            # other shapes, other blocking: float32 rounding of the whole chain (~1e-6 of the logits' scale)
            assert_close(part, full[:, :k], **model_chain(model, N), msg=f"{kind}/{layout_name} k={k}")
