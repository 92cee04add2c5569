"""Tests for our LlamaGen VQ-16 tokenizer, using random weights of the real architecture."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from dpar_scale.tokenizer.vq16 import VQ16Tokenizer, load_llamagen_vq16, save_llamagen_format
from tolerances import abs_tol

# Parameter names as they appear in LlamaGen's VQModel
# (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py), with their shapes for VQ-16.
LLAMAGEN_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.1.q.weight": (512, 512, 1, 1),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "quant_conv.weight": (8, 256, 1, 1),
    "quantize.embedding.weight": (16384, 8),
    "post_quant_conv.weight": (256, 8, 1, 1),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.conv_blocks.0.attn.2.norm.weight": (512,),
    "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.3.res.2.conv2.weight": (128, 128, 3, 3),
    "decoder.conv_blocks.4.res.0.norm1.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VQ16Tokenizer()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("vq16") / "vq_ds16_c2i.pt"
    save_llamagen_format(model, path)
    return path


def _images(size, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen) * 2 - 1


def test_class_attributes():
    assert (VQ16Tokenizer.vocab_size, VQ16Tokenizer.downsample, VQ16Tokenizer.name) == (16384, 16, "llamagen-vq16")


def test_state_dict_uses_llamagen_names(model):
    state = model.state_dict()
    for key, shape in LLAMAGEN_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    # 72M parameters, as listed for vq_ds16_c2i in LlamaGen's README.
    assert round(sum(v.numel() for v in state.values()) / 1e6) == 72


def test_save_then_load_round_trips(model, checkpoint):
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert list(saved) == ["model"]
    # The training-only usage buffer is written so LlamaGen's own module can load the file.
    assert saved["model"]["quantize.codebook_used"].shape == (65536,)

    loaded = load_llamagen_vq16(checkpoint)
    assert not loaded.training
    original = model.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)


@pytest.mark.parametrize("size", [32, 64])
def test_encode_shape_dtype_range(model, size):
    codes = model.encode(_images(size))
    assert codes.shape == (2, size // 16, size // 16)
    assert codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 16384


def test_encode_rejects_sizes_not_divisible_by_16(model):
    with pytest.raises(ValueError, match="40x32"):
        model.encode(torch.zeros(1, 3, 40, 32))


def test_decode_shape_and_range(model):
    codes = torch.randint(0, 16384, (2, 3, 2), generator=torch.Generator().manual_seed(2))
    images = model.decode(codes)
    assert images.shape == (2, 3, 48, 32)
    assert images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert not images.requires_grad


def test_decode_rejects_out_of_range_codes(model):
    with pytest.raises(ValueError, match="16384"):
        model.decode(torch.full((1, 2, 2), 16384))


def test_quantiser_picks_nearest_normalised_code(model):
    images = _images(64, batch=3)
    codes = model.encode(images)
    with torch.no_grad():
        z = model.pre_quant(images)
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    book = F.normalize(model.quantize.embedding.weight.detach(), dim=-1)
    dist = torch.cdist(flat.double(), book.double())  # brute force over all 16,384 entries
    chosen = dist.gather(1, codes.reshape(-1, 1)).squeeze(1)
    # Allow float rounding only: the chosen entry must be (one of) the closest. The quantiser takes the largest
    # float32 dot product of unit vectors (8 terms, each rounded: abs_tol(1, reduction=8)); squared distances are
    # 2 - 2·dot, so a near-tie resolved the other way leaves the chosen one within 2 x 2 such errors of the best.
    slack = 4 * abs_tol(1.0, reduction=8)
    assert torch.all(chosen ** 2 <= dist.min(dim=1).values ** 2 + slack)
    assert (codes.reshape(-1) == dist.argmin(dim=1)).float().mean() > 0.95


def test_missing_file_explains_what_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_llamagen_vq16(tmp_path / "nowhere.pt")
    message = str(info.value)
    assert "vq_ds16_c2i.pt" in message
    assert "nothing is downloaded" in message
    assert "huggingface.co/FoundationVision/LlamaGen" in message


def test_foreign_checkpoints_are_rejected(checkpoint, tmp_path):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]

    renamed = dict(state)
    renamed["encoder.conv_input.weight"] = renamed.pop("encoder.conv_in.weight")
    torch.save({"model": renamed}, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"is not a LlamaGen VQ-16 checkpoint; missing keys: encoder\.conv_in\.weight"
                                         r".*; unexpected keys: encoder\.conv_input\.weight"):
        load_llamagen_vq16(tmp_path / "renamed.pt")

    resized = dict(state)
    resized["quantize.embedding.weight"] = torch.zeros(8192, 8)
    torch.save({"model": resized}, tmp_path / "resized.pt")
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight: \(8192, 8\)"):
        load_llamagen_vq16(tmp_path / "resized.pt")

    torch.save({"weights": {}}, tmp_path / "no_model.pt")
    with pytest.raises(ValueError, match="not a LlamaGen checkpoint"):
        load_llamagen_vq16(tmp_path / "no_model.pt")


def test_pickled_objects_are_refused_with_advice(tmp_path):
    # Training checkpoints from LlamaGen's vq_train.py also pickle an argparse.Namespace.
    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "train_ckpt.pt")
    with pytest.raises(ValueError, match="weights-only loading refused it"):
        load_llamagen_vq16(tmp_path / "train_ckpt.pt")
