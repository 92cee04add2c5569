"""FLOPs of text models: the caption prefix is counted (analytic == fvcore == FlopCounterMode on a batch with
captions of different lengths), and replaces the class position: DPAR's global documents are M_i + L_i long, a
text GPT's rows L_i + N - 1."""
import pytest
import torch

from dpar_scale.config import ModelConfig, TextConfig
from dpar_scale.flops import analytic as F
from dpar_scale.flops import counting as C
from dpar_scale.patching.layout import PatchLayout

GRID = (4, 6)
PATCHES = [[1, 2, 3, 4, 2, 4, 2, 4, 2], [1] * 24, [1, 4, 1, 4, 4, 4, 3, 3]]
TEXT = [5, 1, 9]


def text_cfg(kind):
    depth = dict(n_encoder_layers=2, n_global_layers=3, n_decoder_layers=2) if kind == "dpar" else dict(n_layers=3)
    return ModelConfig(kind=kind, dim=64, n_heads=4, grid=GRID, vocab_size=96, num_classes=10, dropout=0.0,
                       class_dropout=0.0, conditioning="text", text=TextConfig(vocab_size=40, dropout=0.0), **depth)


@pytest.mark.parametrize("kind", ["dpar", "gpt"])
@pytest.mark.parametrize("attention", ["full", "exact"])
def test_counters_agree_on_a_text_batch(kind, attention):
    cfg = text_cfg(kind)
    model, scale = C.counting_model(cfg, probe=False)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 96, (3, GRID[0] * GRID[1]), generator=gen)
    text = (torch.randint(3, 40, (sum(TEXT),), generator=gen), torch.tensor(TEXT))
    layout = PatchLayout.from_lengths(PATCHES, GRID, cond_lengths=TEXT) if kind == "dpar" else None
    counts = C.count_ops(model, codes, None, layout, attention=attention, scale=scale, text=text)
    # the dense implementation runs the GPT's left padding (to the longest caption) and DPAR's padded patch queries
    analytic = F.analytic_breakdown(cfg, batch_images=3, layout=layout, attention=attention, include_padding=True,
                                    text_lengths=TEXT)
    for name in ("fvcore", "FlopCounterMode"):
        assert counts[name].groups() == analytic.groups(), name


def test_the_prefix_replaces_the_class_position():
    d, block = 64, 4 * 64 * 64 + 3 * 64 * 256  # LLaMA block MACs per position (hidden 256 for d = 64)
    dpar, gpt = text_cfg("dpar"), text_cfg("gpt")
    as_class = {k: ModelConfig(**{**vars(c), "conditioning": "class"}) for k, c in (("dpar", dpar), ("gpt", gpt))}
    extra = sum(TEXT) - 3  # caption positions beyond one class position per image
    for kind, cfg, n_layers in (("dpar", dpar, 3), ("gpt", gpt, 3)):
        kw = dict(patch_lengths=PATCHES) if kind == "dpar" else {}
        text = F.analytic_breakdown(cfg, batch_images=3, text_lengths=TEXT, **kw)
        klass = F.analytic_breakdown(as_class[kind], batch_images=3, **kw)
        assert text.matmul["global"] - klass.matmul["global"] == 2 * n_layers * extra * block
        assert text.matmul["head"] == klass.matmul["head"]  # the head runs on codes only
        if kind == "dpar":
            pairs = sum((len(p) + t) ** 2 - (len(p) + 1) ** 2 for p, t in zip(PATCHES, TEXT))
        else:
            pairs = sum((t + 23) ** 2 - 24 ** 2 for t in TEXT)
        assert text.attention["global"] - klass.attention["global"] == 2 * n_layers * pairs * 2 * d
    # one length for all images broadcasts
    assert F.forward_flops(gpt, batch_images=3, text_lengths=4) == F.forward_flops(gpt, batch_images=3,
                                                                                   text_lengths=[4, 4, 4])
    with pytest.raises(ValueError, match="one caption length >= 1 per image"):
        F.forward_flops(gpt, batch_images=3, text_lengths=[4, 0, 1])


def test_count_flops_tool_counts_the_prefix(tmp_path):
    import json

    from sampling_fixtures import load_tool

    tool = load_tool("count_flops")
    common = ["--model", "dpar-tiny", "--baseline", "gpt-tiny", "--image-size", "64", "--mean-patch-length", "2",
              "--vocab", "64"]
    assert tool.main(common + ["--json", str(tmp_path / "class.json")]) == 0
    assert tool.main(common + ["--text-length", "7", "--text-vocab", "40", "--json", str(tmp_path / "t.json")]) == 0
    klass, text = (json.loads((tmp_path / f).read_text()) for f in ("class.json", "t.json"))
    for name in ("dpar-tiny", "gpt-tiny"):  # one class position -> 7 caption positions per image
        assert text["models"][name]["global_positions_per_image"] == klass["models"][name][
            "global_positions_per_image"] + 6
        assert text["models"][name]["train_flops_per_image"] > klass["models"][name]["train_flops_per_image"]
    assert text["layout"]["text_length"] == 7
    assert tool.main(["--model", "dpar-tiny-text", "--baseline", "gpt-tiny", "--image-size", "64",
                      "--mean-patch-length", "2"]) == 2  # a text preset needs --text-length
