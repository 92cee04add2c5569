"""Packing: a packed batch computes exactly what each image computes alone; layouts and the packer are right."""
import warnings

import pytest
import torch

from dpar_scale.data.packing import pack_microbatches, packing_summary
from dpar_scale.patching.layout import PatchLayout, static_lengths
from dpar_scale.models import DPAR, GPT, AttentionMask, attend, flex_available
from tolerances import assert_close, model_chain

GRID = (4, 6)
N = 24
VOCAB, CLASSES = 41, 6
COMMON = dict(dim=32, n_heads=2, vocab_size=VOCAB, grid=GRID, multiple_of=16, dropout=0.0, class_dropout=0.0)
# Different patch counts (24, 8, 12) -> Σ (M_i + 1) = 47, padded to 48 with pad_to_multiple=4.
LENGTHS = [[1] * N, [1, 2, 3] + [4, 2] * 2 + [6], static_lengths(GRID, 2)]
FLEX_OK, FLEX_WHY = flex_available()




# model.dpar structures: (decoder_injection, cross_attn_ffn) — the authors' (the default) and the legacy one
STRUCTURES = {"authors": ("every", False), "legacy": ("first", True)}


def dpar(backend="sdpa", global_rope="dynamic", structure="authors"):
    torch.manual_seed(0)
    injection, ffn = STRUCTURES[structure]
    model = DPAR(n_encoder_layers=1, n_global_layers=2, n_decoder_layers=2, num_classes=CLASSES,
                 global_rope=global_rope, attention_backend=backend, decoder_injection=injection,
                 cross_attn_ffn=ffn, **COMMON)
    with torch.no_grad():
        model.output.weight.normal_(std=0.5)  # the LlamaGen init zeroes it
    return model.eval()


def inputs():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (len(LENGTHS), N)), torch.tensor([0, 5, 2])


# ------------------------------------------------------------------------------------------------ layouts
def test_layout_packed_description():
    lay = PatchLayout.from_lengths(LENGTHS, GRID, pad_to_multiple=4)
    counts = [len(x) for x in LENGTHS]
    assert lay.num_patches.tolist() == counts and lay.max_patches == 24
    assert lay.cu_seqlens.tolist() == [0, 25, 34, 47] and lay.cu_seqlens.dtype == torch.int32
    assert lay.num_global_positions == 47 and lay.packed_length == 48 and lay.max_seqlen == 25
    assert lay.packed_image_id.tolist() == [0] * 25 + [1] * 9 + [2] * 13 + [-1]
    assert lay.packed_pos[25:34].tolist() == list(range(9))
    # image 1: patches start at codes 0, 1, 3, 6, 10, 12, 16, 18 (rows of 6)
    starts = [0, 1, 3, 6, 10, 12, 16, 18]
    ends = [0, 2, 5, 9, 11, 15, 17, 23]
    assert lay.patch_start[1, :8].tolist() == starts and lay.patch_end[1, :8].tolist() == ends
    assert lay.packed_row[26:34].tolist() == [s // 6 for s in starts]
    assert lay.packed_col_start[26:34].tolist() == [s % 6 for s in starts]
    assert lay.packed_col_end[26:34].tolist() == [e % 6 for e in ends]
    assert lay.patch_to_packed[1, :8].tolist() == list(range(26, 34)) and (lay.patch_to_packed[1, 8:] == -1).all()
    # code t of patch m reads packed position cu + m (class + patches < m)
    assert lay.code_to_packed[1].tolist() == [25 + m for m in lay.patch_id[1].tolist()]
    assert lay.patch_id[1, :7].tolist() == [0, 1, 1, 2, 2, 2, 3]


def test_layout_builders_agree_and_pack():
    lay = PatchLayout.from_lengths(LENGTHS, GRID, pad_to_multiple=4)
    again = PatchLayout.from_patch_ids(lay.patch_id, GRID, pad_to_multiple=4)
    starts = torch.zeros(len(LENGTHS), N, dtype=torch.bool)
    starts[lay.patch_valid.nonzero()[:, 0], lay.patch_start[lay.patch_valid]] = True
    third = PatchLayout.from_starts(starts, GRID, pad_to_multiple=4)
    for other in (again, third):
        assert other.lengths == lay.lengths and torch.equal(other.packed_source, lay.packed_source)
    g = torch.Generator().manual_seed(3)
    cls, patches = torch.randn(3, 5, generator=g), torch.randn(3, lay.max_patches, 5, generator=g)
    packed = lay.pack(cls, patches)
    for i, m in enumerate(lay.num_patches.tolist()):
        c = int(lay.cu_seqlens[i])
        assert torch.equal(packed[c], cls[i]) and torch.equal(packed[c + 1: c + 1 + m], patches[i, :m])
    assert torch.equal(packed[47], torch.zeros(5))
    with pytest.raises(ValueError, match=r"image 0: patch lengths must be positive and sum to 24 codes \(grid 4x6\); "
                                         r"got 4 lengths summing to 20"):
        PatchLayout.from_lengths([[5] * 4], GRID)
    assert static_lengths(GRID, 4) == [4, 2] * 4 and static_lengths(GRID, 4, row_reset=False) == [4] * 6


def test_dynamic_rope_layout():
    from dpar_scale.models.rope import apply_rope, rope_2d, rope_dynamic

    hd = 32  # 8 column pairs -> groups of 2: col_start, col_end, col_end, col_start
    lay = PatchLayout.from_lengths([[1] * N, [2, 4] * 4], GRID)
    table = rope_dynamic(lay.packed_row, lay.packed_col_start, lay.packed_col_end, hd)
    grid = rope_2d(*GRID, hd)
    assert torch.equal(table[1:25], grid)  # one-code patches get exactly the code's 2-D RoPE (same angles, same ops)
    assert torch.equal(table[0], torch.stack([torch.ones(16), torch.zeros(16)], -1))  # class: identity
    # image 1, patch 1 = codes 2..5 (row 0, cols 2..5): row half at 0, column groups at 2, 5, 5, 2
    angles = torch.atan2(table[25 + 2, :, 1], table[25 + 2, :, 0])
    freqs = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    expect = torch.cat([0 * freqs, torch.cat([2 * freqs[:2], 5 * freqs[2:4], 5 * freqs[4:6], 2 * freqs[6:]])])
    # cos/sin then atan2 round-trip an angle of at most 5 rad within a few float32 ulps of π
    assert_close(angles, torch.remainder(expect + torch.pi, 2 * torch.pi) - torch.pi, depth=3)
    x = torch.randn(1, N, 2, hd, generator=torch.Generator().manual_seed(2))
    # a rotation keeps norms: both norms sum hd squares, the rotated ones after one multiply-add per pair
    assert_close(apply_rope(x, grid).norm(dim=-1), x.norm(dim=-1), reduction=hd, depth=2)


# ------------------------------------------------------------------------------------- packed == unpacked
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_packed_equals_unpacked(structure):
    model = dpar(structure=structure)
    codes, labels = inputs()
    lay = PatchLayout.from_lengths(LENGTHS, GRID, pad_to_multiple=4)
    assert lay.packed_length > lay.num_global_positions  # the padding path is exercised
    with torch.no_grad():
        enc = model.encode(codes)
        patches = model.patch_embeddings(enc, lay)
        glob = model.run_global(patches, labels, lay)
        logits = model.decode(enc, glob, lay)
        for i, lengths in enumerate(LENGTHS):
            alone = PatchLayout.from_lengths([lengths], GRID)
            enc_i = model.encode(codes[i: i + 1])
            patches_i = model.patch_embeddings(enc_i, alone)
            glob_i = model.run_global(patches_i, labels[i: i + 1], alone)
            m, c = len(lengths), int(lay.cu_seqlens[i])
            chain = model_chain(model, N)  # other batch shapes, so other blocking: float32 rounding only
            assert_close(patches[i, :m], patches_i[0], **chain, msg="cross-attention")
            assert (patches[i, m:] == 0).all()
            assert_close(glob[c: c + m + 1], glob_i[: m + 1], **chain, msg="global")
            assert_close(logits[i], model(codes[i: i + 1], labels[i: i + 1], alone)[0], **chain, msg="logits")
        assert torch.isfinite(glob).all()


def test_padding_rows_are_finite_and_zero():
    q = torch.randn(2, 2, 6, 8, generator=torch.Generator().manual_seed(4)).requires_grad_()
    ids = torch.tensor([[0, 0, 1, 1, -1, -1], [0, 0, 0, 0, 0, -1]])
    mask = AttentionMask(causal=True, q_ids=ids, kv_ids=ids)
    out = attend(q, q, q, mask, "sdpa")
    assert torch.isfinite(out).all() and (out[0, :, 4:] == 0).all() and (out[1, :, 5] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


# ----------------------------------------------------------------------------------------- flex vs sdpa
@pytest.mark.skipif(not FLEX_OK, reason=f"flex_attention does not run here: {FLEX_WHY}")
def test_flex_equals_sdpa():
    codes, labels = inputs()
    lay = PatchLayout.from_lengths(LENGTHS, GRID, pad_to_multiple=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        for rope, structure in (("dynamic", "authors"), ("1d", "legacy")):
            ref, flex = dpar("sdpa", rope, structure), dpar("flex", rope, structure)
            flex.load_state_dict(ref.state_dict())
            with torch.no_grad():
                assert_close(flex(codes, labels, lay), ref(codes, labels, lay), **model_chain(ref, N), msg=rope)
        torch.manual_seed(0)
        gpt_ref = GPT(n_layers=2, num_classes=CLASSES, **COMMON).eval()
        gpt_flex = GPT(n_layers=2, num_classes=CLASSES, attention_backend="flex", **COMMON).eval()
        gpt_flex.load_state_dict(gpt_ref.state_dict())
        with torch.no_grad():
            assert_close(gpt_flex(codes, labels), gpt_ref(codes, labels), **model_chain(gpt_ref, N), msg="gpt")
        q = torch.randn(2, 2, 6, 8, generator=torch.Generator().manual_seed(5))
        ids = torch.tensor([[0, 0, 1, 1, -1, -1], [0, 0, 0, 0, 0, -1]])
        for causal in (True, False):
            mask = AttentionMask(causal=causal, q_ids=ids, kv_ids=ids)
            assert_close(attend(q, q, q, mask, "flex"), attend(q, q, q, mask, "sdpa"), reduction=8, depth=2)


def reference_layout(lengths, grid, pad, n_codes, cond):
    """Every field of PatchLayout.from_lengths, filled image by image and patch by patch (the module docstring's
    definitions, no vectorisation)."""
    h, w = grid
    b, m_max = len(lengths), max(len(x) for x in lengths)
    total = sum(len(x) + c for x, c in zip(lengths, cond))
    t_len = -(-total // pad) * pad
    n_cond = sum(cond)
    out = {"patch_id": [], "num_patches": [len(x) for x in lengths], "patch_start": [], "patch_end": [],
           "patch_valid": [], "cu_seqlens": [0], "packed_image_id": [-1] * t_len, "packed_pos": [0] * t_len,
           "packed_row": [0] * t_len, "packed_col_start": [0] * t_len, "packed_col_end": [0] * t_len,
           "packed_source": [n_cond + b * m_max] * t_len, "code_to_packed": [], "patch_to_packed": []}
    cond_row = 0
    for i, (ls, c) in enumerate(zip(lengths, cond)):
        base = out["cu_seqlens"][-1]
        for j in range(c + len(ls)):  # the image's run: its condition, then its patches
            out["packed_image_id"][base + j] = i
            out["packed_pos"][base + j] = j - (c - 1)
        for j in range(c):
            out["packed_row"][base + j] = j - (c - 1)
            out["packed_source"][base + j] = cond_row + j
        cond_row += c
        ids, starts, ends, valid, to_packed, code = [], [], [], [], [], 0
        for m in range(m_max):
            if m < len(ls):
                first, last, at = code, code + ls[m] - 1, base + c + m
                ids += [m] * ls[m]
                starts.append(first), ends.append(last), valid.append(True), to_packed.append(at)
                out["packed_row"][at], out["packed_col_start"][at] = first // w, first % w
                out["packed_col_end"][at] = last % w
                out["packed_source"][at] = n_cond + i * m_max + m
                code += ls[m]
            else:
                starts.append(0), ends.append(0), valid.append(False), to_packed.append(-1)
        out["patch_id"].append(ids)
        out["patch_start"].append(starts), out["patch_end"].append(ends), out["patch_valid"].append(valid)
        out["patch_to_packed"].append(to_packed)
        out["code_to_packed"].append([base + c - 1 + p for p in ids])
        out["cu_seqlens"].append(base + c + len(ls))
    return out


def test_vectorised_layout_equals_the_per_image_reference():
    g = torch.Generator().manual_seed(0)

    def draw(high):
        return int(torch.randint(1, high + 1, (1,), generator=g))

    for trial in range(200):
        h, w, b = draw(6), draw(6), draw(7)
        n = h * w if trial % 3 else draw(h * w)  # every third: a generation prefix of the grid
        p_max = [1, 2, 4, 64][trial % 4]
        lengths = []
        for _ in range(b):
            left, ls = n, []
            while left:
                ls.append(draw(min(left, p_max)))
                left -= ls[-1]
            lengths.append(ls)
        cond = [draw(5) for _ in range(b)] if trial % 2 else [1] * b  # captions / classes
        pad = [1, 2, 8, 128][trial % 4]
        layout = PatchLayout.from_lengths(lengths, (h, w), pad, n_codes=n, cond_lengths=cond if trial % 2 else None)
        want = reference_layout(lengths, (h, w), pad, n, cond)
        for name, value in want.items():
            got = getattr(layout, name)
            assert got.tolist() == value, (name, lengths, cond, pad)
            assert got.dtype == (torch.int32 if name == "cu_seqlens" else torch.bool if name == "patch_valid"
                                 else torch.long), name
        assert layout.lengths == tuple(map(tuple, lengths)) and layout.cond_lengths == tuple(cond)
        again = PatchLayout.from_patch_ids(layout.patch_id, (h, w), pad, cond)
        assert again.lengths == layout.lengths and torch.equal(again.code_to_packed, layout.code_to_packed)


# -------------------------------------------------------------------------------------------------- packer
def _stream(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(3, N + 1, (n,), generator=g).tolist()
    return [(i, [1] * (m - 1) + [N - m + 1]) for i, m in enumerate(counts)]  # M_i patches over N codes


@pytest.mark.parametrize("pad", [1, 4])
def test_packer_fills_budget_and_is_deterministic(pad):
    items, budget = _stream(), 64
    batches = list(pack_microbatches(items, budget, pad_to_multiple=pad))
    again = list(pack_microbatches(iter(items), budget, pad_to_multiple=pad))
    assert [b.sample_ids for b in batches] == [b.sample_ids for b in again]
    assert [i for b in batches for i in b.sample_ids] == [i for i, _ in items]  # stream order, nothing lost
    sizes = {len(b) for b in batches}
    assert len(sizes) > 1  # images per micro-batch vary with their patch counts
    for k, b in enumerate(batches):
        assert b.positions == sum(len(x) + 1 for x in b.lengths)
        assert b.padded_positions <= budget and b.padded_positions % pad == 0
        if k + 1 < len(batches):  # greedy: the next image would not have fit
            nxt = len(batches[k + 1].lengths[0]) + 1
            assert -(-(b.positions + nxt) // pad) * pad > budget
        lay = b.layout(GRID)
        assert lay.cu_seqlens[-1] == b.positions and lay.packed_length == b.padded_positions
    summary = packing_summary(batches)
    assert summary["images"] == len(items) and summary["mean_fill"] > 0.8
    print(f"pad={pad}: {summary}")


def test_packer_limits():
    items = [(0, [1] * 10), (1, [1] * 10), (2, [1] * 10)]
    assert [len(b) for b in pack_microbatches(items, 100, max_images=2)] == [2, 1]
    assert [len(b) for b in pack_microbatches(items, 22, drop_last=True)] == [2]
    with pytest.raises(ValueError, match="budget"):
        list(pack_microbatches([(7, [1] * 30)], 16))


def reference_pack(items, budget, pad=1, max_images=None, drop_last=False):
    """The greedy packer image by image: [(ids, lengths, positions)] of each micro-batch, or the ValueError it
    raises with the batches yielded before it."""
    out, ids, lengths, positions = [], [], [], 0
    for item in items:
        cost = len(item[1]) + (item[2] if len(item) > 2 else 1)
        if -(-cost // pad) * pad > budget:
            return out, f"sample {item[0]!r} needs {cost} "
        full = max_images is not None and len(ids) >= max_images
        if ids and (full or -(-(positions + cost) // pad) * pad > budget):
            out.append((ids, lengths, positions))
            ids, lengths, positions = [], [], 0
        ids, lengths, positions = ids + [item[0]], lengths + [list(item[1])], positions + cost
    if ids and not drop_last:
        out.append((ids, lengths, positions))
    return out, None


def test_vectorised_packer_equals_the_per_image_reference():
    g = torch.Generator().manual_seed(0)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=g))

    errors = 0
    for trial in range(300):
        n_items, pad = draw(0, 60), [1, 1, 2, 4, 8][trial % 5]
        budget = draw(1, 60)
        text = trial % 2 == 1
        items = []
        for i in range(n_items):
            m = draw(1, 12 if trial % 7 else 40)  # every seventh stream has images that may not fit alone
            item = (1000 + i, [1] * m)
            items.append(item + (draw(1, 6),) if text else item)
        max_images = [None, 1, 3][trial % 3]
        drop_last = trial % 4 == 3
        want, error = reference_pack(items, budget, pad, max_images, drop_last)
        got = []
        try:
            for mb in pack_microbatches(items, budget, pad, max_images, drop_last, chunk=[1, 3, 7, 1024][trial % 4]):
                got.append((mb.sample_ids, mb.lengths, mb.positions))
                assert mb.padded_positions <= budget and mb.pad_to_multiple == pad
        except ValueError as e:
            assert error is not None and str(e).startswith(error), (str(e), error)
            errors += 1
        else:
            assert error is None, error
        assert got == want, (items, budget, pad, max_images)
    assert 10 < errors < 200
