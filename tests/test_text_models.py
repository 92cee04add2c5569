"""Text-conditioned DPAR and GPT (dpar_scale.models.text_prefix): the caption's tokens prefix each image.

* no leak: changing code t moves no logit of its image at positions <= t, and no logit of any other image;
  changing an image's caption moves its logits and no other image's, also in a packed batch;
* packed == unpacked: images of different caption lengths packed together give each image's own logits;
* caption dropout trains on exactly the empty caption [eos], only in training mode (eval ignores the mask);
* KV-cached generation (the prefix prefilled once, captions of different lengths in one batch) == one forward;
* positions: the caption's last token sits at the class position (identity), earlier ones at negative rows.
"""
import pytest
import torch

from dpar_scale.models import DPAR, GPT
from dpar_scale.patching.layout import PatchLayout
from dpar_scale.patching.rule import patch_lengths
from tolerances import abs_tol, assert_close, magnitude, model_chain

GRID = (4, 6)
N = GRID[0] * GRID[1]
VOCAB, TEXT_VOCAB, EOS = 37, 29, 1
COMMON = dict(dim=32, n_heads=2, vocab_size=VOCAB, grid=GRID, multiple_of=16, dropout=0.1,
              text_vocab_size=TEXT_VOCAB, text_dropout=0.5)
LENGTHS = [4, 1, 7]  # captions of 4 and 7 tokens and the empty caption [eos]


def make(kind: str, rope: str = "dynamic") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(n_layers=3, num_classes=0, **COMMON)
    else:
        model = DPAR(n_encoder_layers=1, n_global_layers=2, n_decoder_layers=2, num_classes=0, global_rope=rope,
                     **COMMON)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the LlamaGen init zeroes the head: weights large enough that every path shows
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))
    return model.eval()


def captions(lengths, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.cat([torch.randint(3, TEXT_VOCAB, (n - 1,), generator=g), torch.tensor([EOS])]) for n in lengths]
    return torch.cat(parts), torch.tensor(lengths)


def layout_for(lengths, pad_to_multiple: int = 4) -> PatchLayout:
    entropy = torch.rand(len(lengths), N, generator=torch.Generator().manual_seed(2)) * 9.7
    return PatchLayout.from_lengths(patch_lengths(entropy, width=GRID[1], threshold=6.0, max_patch_length=4), GRID,
                                    pad_to_multiple=pad_to_multiple, cond_lengths=lengths)


def run(model, codes, ids, lengths, layout=None, **kw):
    if isinstance(model, DPAR) and layout is None:
        layout = layout_for(lengths.tolist())
    return model(codes, layout=layout, text_ids=ids, text_lengths=lengths, **kw)


KINDS = [("gpt", "dynamic"), ("dpar", "dynamic"), ("dpar", "1d")]


@pytest.mark.parametrize("kind,rope", KINDS)
def test_no_leak_with_a_text_prefix(kind, rope):
    model = make(kind, rope)
    ids, lengths = captions(LENGTHS)
    codes = torch.randint(0, VOCAB, (3, N), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = run(model, codes, ids, lengths)
        tol = abs_tol(magnitude(base), **model_chain(model, N + max(LENGTHS)))
        for b in range(3):
            for t in range(N):
                moved = codes.clone()
                moved[b, t] = (moved[b, t] + 1 + (7 * t) % (VOCAB - 1)) % VOCAB  # never the same code
                out = run(model, moved, ids, lengths)
                assert (out[b, :t + 1] - base[b, :t + 1]).abs().max() <= tol, f"code {t} of image {b} leaks"
                if t < N - 1:
                    assert (out[b, t + 1:] - base[b, t + 1:]).abs().max() > 100 * tol, "code t is ignored"
                others = [i for i in range(3) if i != b]
                assert (out[others] - base[others]).abs().max() <= tol, f"image {b}'s code {t} moved another image"
        # a caption moves its own image's logits (from code 0 on) and no other image's
        for b in range(3):
            start = int(lengths[:b].sum())
            for j in range(LENGTHS[b]):
                changed = ids.clone()
                changed[start + j] = 3 + (changed[start + j] + 5) % (TEXT_VOCAB - 3)
                out = run(model, codes, changed, lengths)
                assert (out[b, 0] - base[b, 0]).abs().max() > 100 * tol, f"caption token {j} of image {b} is ignored"
                others = [i for i in range(3) if i != b]
                assert (out[others] - base[others]).abs().max() <= tol, f"image {b}'s caption moved another image"


@pytest.mark.parametrize("kind,rope", KINDS)
def test_packed_equals_each_image_alone(kind, rope):
    model = make(kind, rope)
    ids, lengths = captions(LENGTHS)
    codes = torch.randint(0, VOCAB, (3, N), generator=torch.Generator().manual_seed(4))
    layout = layout_for(LENGTHS)
    with torch.no_grad():
        packed = run(model, codes, ids, lengths, layout)
        tol = model_chain(model, N + max(LENGTHS))
        for b in range(3):
            start = int(lengths[:b].sum())
            alone_layout = PatchLayout.from_lengths([layout.lengths[b]], GRID, cond_lengths=[LENGTHS[b]])
            alone = run(model, codes[b:b + 1], ids[start:start + LENGTHS[b]], lengths[b:b + 1], alone_layout)
            assert_close(packed[b:b + 1], alone, **tol, msg=f"image {b} packed vs alone")
    if kind == "dpar":  # no padding for variable caption lengths: each document is exactly C_i + M_i long
        assert layout.num_global_positions == sum(LENGTHS) + int(layout.num_patches.sum())
        assert layout.cu_seqlens.diff().tolist() == [c + len(x) for c, x in zip(LENGTHS, layout.lengths)]


@pytest.mark.parametrize("kind", ["gpt", "dpar"])
def test_caption_dropout_is_the_empty_caption_and_only_in_training(kind):
    model = make(kind)
    for m in model.modules():  # isolate caption dropout from the activations' dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids, lengths = captions(LENGTHS)
    codes = torch.randint(0, VOCAB, (3, N), generator=torch.Generator().manual_seed(5))
    drop = torch.tensor([True, False, False])
    layout = layout_for(LENGTHS)
    empty_ids = torch.cat([torch.tensor([EOS]), ids[4:]])  # image 0's caption replaced by [eos]
    empty_lengths = torch.tensor([1, 1, 7])
    empty_layout = layout.with_cond_lengths([1, 1, 7])
    with torch.no_grad():
        model.eval()
        kept = run(model, codes, ids, lengths, layout)
        assert torch.equal(run(model, codes, ids, lengths, layout, drop_text=drop), kept), "eval dropped a caption"
        empty = run(model, codes, empty_ids, empty_lengths, empty_layout)
        model.train()
        dropped = run(model, codes, ids, lengths, layout, drop_text=drop)
        none = run(model, codes, ids, lengths, layout, drop_text=torch.zeros(3, dtype=torch.bool))
    tol = model_chain(model, N + 7)
    assert_close(dropped, empty, **tol, msg="a dropped caption trains on [eos]")
    assert_close(none, kept, **tol, msg="nothing dropped")
    assert (dropped[0] - kept[0]).abs().max() > 1e-3, "dropout did not change the dropped image"


def generate_logits(model, codes, ids, lengths, layout):
    """Teacher-forced incremental decoding: the prefix prefilled once, then one code per step."""
    width = max(lengths.tolist())
    cache = model.new_cache(codes.shape[0], text_width=width)
    if isinstance(model, GPT):
        out = [model.step(cache, None, text_ids=ids, text_lengths=lengths)[:, -1]]
        out += [model.step(cache, codes[:, t:t + 1])[:, 0] for t in range(N - 1)]
    else:
        out = [model.start(cache, text_ids=ids, text_lengths=lengths)]
        closes = layout.patch_id[:, 1:] != layout.patch_id[:, :-1]  # code t ends its patch
        out += [model.step(cache, codes[:, t], closes[:, t]) for t in range(N - 1)]
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind,rope", KINDS)
def test_kv_cached_decoding_with_prompts_equals_the_forward(kind, rope):
    model = make(kind, rope)
    ids, lengths = captions(LENGTHS)
    codes = torch.randint(0, VOCAB, (3, N), generator=torch.Generator().manual_seed(6))
    layout = layout_for(LENGTHS, pad_to_multiple=1)
    with torch.no_grad():
        full = run(model, codes, ids, lengths, layout)
        cached = generate_logits(model, codes, ids, lengths, layout)
    assert_close(cached, full, **model_chain(model, N + 7), msg="cached vs forward")


def test_text_positions_sit_above_the_picture():
    layout = PatchLayout.from_lengths([[1, 2, 3] + [6] * 3, [1, 5] + [6] * 3], GRID, cond_lengths=[3, 1])
    doc0 = slice(0, 3 + 6)
    assert layout.packed_pos[doc0].tolist() == [-2, -1, 0, 1, 2, 3, 4, 5, 6]  # patches as with a class
    assert layout.packed_row[doc0].tolist()[:3] == [-2, -1, 0] and layout.packed_col_start[:3].tolist() == [0] * 3
    assert layout.code_to_packed[0, :4].tolist() == [2, 3, 3, 4]  # code 0 reads the eos, codes 1-2 patch 0, ...
    assert layout.code_to_packed[1, 0].item() == 9 and layout.code_to_packed[1, 1].item() == 10
    # the class layout is unchanged: one condition position per image at position 0
    assert PatchLayout.from_lengths(layout.lengths, GRID).packed_pos[:3].tolist() == [0, 1, 2]


def test_text_models_refuse_inputs_without_captions():
    ids, lengths = captions(LENGTHS)
    codes = torch.zeros(3, N, dtype=torch.long)
    with pytest.raises(ValueError, match="text-conditioned: pass text_ids"):
        make("gpt")(codes)
    with pytest.raises(ValueError, match="build it with cond_lengths=text_lengths"):
        make("dpar")(codes, layout=layout_for([1, 1, 1]), text_ids=ids, text_lengths=lengths)
    with pytest.raises(ValueError, match="3 captions for 2 images"):
        make("gpt")(codes[:2], text_ids=ids, text_lengths=lengths)


@pytest.mark.parametrize("kind", ["gpt", "dpar"])
def test_sampling_with_prompts_cached_equals_uncached(kind):
    """CFG with the prompts and the empty caption as the two halves of one batch, prompts of different lengths:
    the KV-cached generation (prefix prefilled once) draws exactly the codes the uncached one draws."""
    from dpar_scale.config import PatchConfig
    from dpar_scale.sampling.generate import GenerationStats, generate_dpar, generate_gpt
    from dpar_scale.sampling.streams import sample_uniforms

    model = make(kind)
    ids, lengths = captions(LENGTHS)
    uniforms = sample_uniforms(0, range(3), N)
    labels = torch.zeros(3, dtype=torch.long)
    runs = []
    for use_cache in (True, False):
        stats = GenerationStats()
        draw = dict(uniforms=uniforms, cfg_scale=2.5, temperature=1.0, use_cache=use_cache, stats=stats,
                    text=(ids, lengths, EOS))
        if kind == "gpt":
            runs.append((generate_gpt(model, labels, **draw), None))
        else:
            torch.manual_seed(1)
            entropy = GPT(n_layers=1, num_classes=0, dim=32, n_heads=2, vocab_size=VOCAB, grid=GRID, multiple_of=16)
            with torch.no_grad():
                for p in entropy.parameters():
                    p.copy_(torch.randn(p.shape) * 0.3)
            runs.append(generate_dpar(model, entropy.eval(), labels, patch_cfg=PatchConfig(threshold=3.4), **draw))
    (cached, lengths_c), (uncached, lengths_u) = runs
    assert torch.equal(cached, uncached)
    assert lengths_c == lengths_u
    # the prompts matter: other prompts draw other images from the same random streams
    other = (torch.cat([torch.tensor([5, 6, EOS]), torch.tensor([EOS]), torch.tensor([7, EOS])]),
             torch.tensor([3, 1, 2]), EOS)
    if kind == "gpt":
        moved = generate_gpt(model, labels, uniforms=uniforms, cfg_scale=2.5, text=other)
        assert not torch.equal(moved, cached)
    with pytest.raises(ValueError, match="text-conditioned: pass text="):
        generate_gpt(make("gpt"), labels, uniforms=uniforms)
