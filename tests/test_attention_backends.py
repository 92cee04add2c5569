"""Attention backends: each one that runs here equals the reference (a materialised mask), the packed global
attention computes at most 1.1 x the pairs its documents need (counted on the kernels' inputs), the patch
cross-attention sees [M, P_max] gathered keys, and `auto` resolves as documented."""
import warnings

import pytest
import torch

from dpar_scale.flops.counting import sdpa_pair_counter
from dpar_scale.models import DPAR, AttentionMask, attend, flex_available
from dpar_scale.models.attention import attend_reference, resolve_backend
from dpar_scale.models.packed_attention import GROUP_SLACK, build_packed_plan, group_documents, varlen_available
from dpar_scale.patching.layout import PatchLayout
from dpar_scale.patching.rule import synthetic_patch_lengths
from tolerances import assert_close, model_chain

FLEX_OK, FLEX_WHY = flex_available()
VARLEN_OK, VARLEN_WHY = varlen_available()


def demo_lengths(batch=32, grid=16, mean=1.81, p_max=4, seed=0):
    """Patch lengths of the demo's shape (16x16 codes, mean patch length 1.81, P_max 4)."""
    return synthetic_patch_lengths(batch, grid, mean_length=mean, max_patch_length=p_max, seed=seed)


def spread_lengths(seed=0):
    """Documents of wildly different lengths (1 .. 257 positions): the grouping's worst case."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 258, (64,), generator=g).tolist()


@pytest.mark.parametrize("case", ["demo", "demo-seed1", "spread", "equal"])
def test_grouping_pays_at_most_the_slack(case):
    if case.startswith("demo"):
        lengths = [len(x) + 1 for x in demo_lengths(seed=int(case.endswith("1")))]
    else:
        lengths = spread_lengths() if case == "spread" else [142] * 32
    groups = group_documents(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every document once
    computed = sum(len(g) * max(lengths[i] for i in g) ** 2 for g in groups)
    needed = sum(x * x for x in lengths)
    assert computed <= GROUP_SLACK * needed
    padded_batch = len(lengths) * max(lengths) ** 2  # what one padded batch of width L_max costs
    if case == "equal":
        assert len(groups) == 1 and computed == needed
    else:
        assert computed < padded_batch and len(groups) < len(lengths) / 2
    print(case, len(groups), "groups", computed / needed, "vs padded batch", padded_batch / needed)


def _packed_case(seed=0, lengths=(9, 1, 25, 13), pad=5, heads=2, dh=8):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths) + pad
    ids = torch.full((1, t), -1, dtype=torch.long)
    ids[0, :sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    q, k, v = (torch.randn(1, heads, t, dh, generator=g, dtype=torch.float64).float() for _ in range(3))
    return q, k, v, ids, list(lengths)


@pytest.mark.parametrize("kind", ["groups", "dense"] + (["flex"] if FLEX_OK else []))
def test_packed_backends_equal_the_reference(kind):
    q, k, v, ids, lengths = _packed_case()
    mask = AttentionMask.packed(ids, lengths)
    ref = attend_reference(q, k, v, mask)
    mask.plan = build_packed_plan(kind, lengths, ids.shape[1], "cpu", mask)
    backend = "flex" if kind == "flex" else "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        out = attend(q, k, v, mask, backend)
    assert_close(out, ref, reduction=max(lengths), depth=2, msg=kind)
    assert (out[0, :, sum(lengths):] == 0).all()  # padding rows are zero
    if kind == "flex":
        return  # flex has no CPU backward in torch 2.13
    grads = []
    for run in (lambda a, b, c: attend(a, b, c, mask, backend), lambda a, b, c: attend_reference(a, b, c, mask)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        (run(*leaves) * torch.linspace(-1, 1, q.shape[-1])).sum().backward()
        grads.append([x.grad for x in leaves])
    for got, want, name in zip(*grads, "qkv"):
        assert torch.isfinite(got).all()
        assert_close(got, want, reduction=max(lengths), depth=3, msg=f"{kind} d{name}")


def test_gathered_cross_attention_equals_the_reference_and_sees_p_max_keys():
    lay = PatchLayout.from_lengths([[1, 2, 3, 4, 2], [4, 4, 4], [1] * 12], (2, 6))
    b, m, n, h, dh = 3, lay.max_patches, 12, 2, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(b, h, m, dh, generator=g), torch.randn(b, h, n, dh, generator=g), torch.randn(
        b, h, n, dh, generator=g)
    from dpar_scale.models.packed_attention import gather_keys

    q_ids = torch.where(lay.patch_valid, torch.arange(m)[None], -1)
    patch_len = torch.where(lay.patch_valid, lay.patch_end - lay.patch_start + 1, 0)
    index, valid = gather_keys(lay.patch_start, patch_len, 4)
    mask = AttentionMask.gathered(q_ids, lay.patch_id, index, valid)
    dense = AttentionMask(q_ids=q_ids, kv_ids=lay.patch_id)
    for backend in ["sdpa", "auto"] + (["flex"] if FLEX_OK else []):
        assert_close(attend(q, k, v, mask, backend), attend_reference(q, k, v, dense), reduction=4, depth=2,
                     msg=backend)

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(qq, kk, *args, **kwargs):
        calls.append((tuple(qq.shape), tuple(kk.shape)))
        return real(qq, kk, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        attend(q, k, v, mask, "sdpa")
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert calls == [((b * m, h, 1, dh), (b * m, h, 4, dh))]  # B·M queries x P_max keys, not B x M x N


def _demo_dpar():
    torch.manual_seed(0)
    return DPAR(dim=32, n_heads=2, n_encoder_layers=1, n_global_layers=2, n_decoder_layers=1, vocab_size=64,
                num_classes=10, grid=(16, 16), multiple_of=16, dropout=0.0, class_dropout=0.0).eval()


def test_global_attention_computes_at_most_the_slack_of_what_documents_need():
    """Brute force: every SDPA call inside the global layers is intercepted and its batch·Lq·Lk summed."""
    model = _demo_dpar()
    lengths = demo_lengths()
    lay = PatchLayout.from_lengths(lengths, (16, 16), pad_to_multiple=128)
    codes, labels = torch.randint(0, 64, (32, 256)), torch.randint(0, 10, (32,))
    with torch.no_grad(), sdpa_pair_counter(list(model.global_layers)) as counted:
        model(codes, labels, lay)
    needed = sum(x * x for x in lay.doc_lengths) * len(model.global_layers)
    assert counted["calls"] > len(model.global_layers)  # grouped: several calls per layer
    assert needed <= counted["pairs"] <= GROUP_SLACK * needed
    old = len(lengths) * lay.max_seqlen ** 2 * len(model.global_layers)  # the former padded batch of width L_max
    print(f"computed / Σ L² = {counted['pairs'] / needed:.3f} ({counted['calls']} calls); padded batch "
          f"{old / needed:.3f}")


@pytest.mark.parametrize("backend", ["sdpa", "auto"] + (["flex"] if FLEX_OK else []))
def test_dpar_on_each_backend_equals_the_reference(backend):
    """The whole model: a backend's logits equal those of a model whose attention is the materialised mask."""
    from dpar_scale.models import layers

    model = _demo_dpar()
    model.attention_backend = backend
    for layer in model.modules():
        if hasattr(layer, "backend"):
            layer.backend = backend
    lay = PatchLayout.from_lengths(demo_lengths(batch=4), (16, 16), pad_to_multiple=8)
    codes, labels = torch.randint(0, 64, (4, 256)), torch.randint(0, 10, (4,))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(codes, labels, lay)
        real = layers.attend
        layers.attend = lambda q, k, v, mask, backend="sdpa": attend_reference(q, k, v, mask)
        try:
            ref = model(codes, labels, lay)
        finally:
            layers.attend = real
    assert_close(out, ref, **model_chain(model, 256), msg=backend)


def test_auto_resolution():
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="varlen needs a CUDA device"):
        resolve_backend("varlen", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("fast", "cpu", torch.float32)
    if VARLEN_OK:
        assert resolve_backend("auto", "cuda", torch.bfloat16) == "varlen"
        assert resolve_backend("auto", "cuda", torch.float32) == "sdpa"


@pytest.mark.skipif(not VARLEN_OK, reason=f"varlen_attn does not run here: {VARLEN_WHY}")
def test_varlen_equals_the_reference():
    q, k, v, ids, lengths = _packed_case()
    q, k, v, ids = (x.cuda() for x in (q, k, v, ids))
    mask = AttentionMask.packed(ids, lengths).prepare("varlen", "cuda", torch.bfloat16)
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, "auto")
    ref = attend_reference(q, k, v, AttentionMask.packed(ids, lengths))
    assert_close(out.float(), ref, reduction=max(lengths), depth=2, dtype=torch.bfloat16)


def _reference_groups(lengths, slack):
    """group_documents document by document (the rule of its docstring, no vectorisation)."""
    live = [i for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if lengths[i] > 0]
    share = sum(lengths[i] ** 2 for i in live) / max(len(live), 1)
    groups, width = [], 0
    for i in live:
        sq = lengths[i] ** 2
        if groups and width * width - sq <= (slack - 1) / 2 * (sq + share):
            groups[-1].append(i)
        else:
            groups.append([i])
            width = lengths[i]
    return groups


def _reference_grouped_plan(lengths, length, slack):
    """(groups, index, inverse) of the grouped SDPA plan, built group by group and slot by slot."""
    starts = [sum(lengths[:d]) for d in range(len(lengths))]
    index, inverse, groups = [], [None] * length, []
    for docs in _reference_groups(lengths, slack):
        width = lengths[docs[0]]
        for d in docs:
            for a in range(width):
                if a < lengths[d]:
                    inverse[starts[d] + a] = len(index)
                index.append(starts[d] + min(a, lengths[d] - 1))
        groups.append((len(docs), width))
    return tuple(groups), index, [len(index) if x is None else x for x in inverse]


def test_vectorised_grouped_plan_equals_the_per_document_reference():
    g = torch.Generator().manual_seed(0)
    cases = 0
    for trial in range(300):
        n = int(torch.randint(1, 48, (1,), generator=g))
        longest = [1, 3, 12, 150][trial % 4]
        lengths = torch.randint(1, longest + 1, (n,), generator=g)
        lengths[torch.rand(n, generator=g) < 0.1] = 0  # empty documents (e.g. dropped captions' halves)
        lengths = lengths.tolist()
        slack = [1.0, 1.05, GROUP_SLACK, 1.5, 4.0][trial % 5]
        assert group_documents(lengths, slack) == _reference_groups(lengths, slack), (lengths, slack)
        if sum(lengths) == 0:
            continue
        length = sum(lengths) + trial % 6
        plan = build_packed_plan("groups", lengths, length, "cpu", slack=slack)
        groups, index, inverse = _reference_grouped_plan(lengths, length, slack)
        assert plan.groups == groups
        assert plan.index.dtype == plan.inverse.dtype == torch.long
        assert plan.index.tolist() == index and plan.inverse.tolist() == inverse, (lengths, slack)
        cases += 1
    assert cases > 250
