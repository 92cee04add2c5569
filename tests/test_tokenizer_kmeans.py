"""The embedded k-means block tokenizer and the tokenizer dispatch."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from dpar_scale.data.synthetic import generate_dataset, render_image
from dpar_scale.tokenizer import TOKENIZER_NAMES, load_tokenizer
from dpar_scale.tokenizer.kmeans import KMeansTokenizer, fit_kmeans, image_blocks, psnr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(seed, per_class=6, classes=10):
    arr = np.stack([render_image(c, i, 64, seed) for c in range(classes) for i in range(per_class)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)


@pytest.fixture(scope="module")
def train_images():
    return _images(seed=0)


@pytest.fixture(scope="module")
def tok(train_images):
    return KMeansTokenizer.fit(train_images, codebook_size=256, seed=0)


def test_shapes_and_attributes(tok, train_images):
    assert tok.name == "kmeans" and tok.vocab_size == 256 and tok.downsample == 4
    codes = tok.encode(train_images[:5])
    assert codes.shape == (5, 16, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 256
    rec = tok.decode(codes)
    assert rec.shape == (5, 3, 64, 64) and rec.dtype == torch.float32
    assert float(rec.min()) >= -1 and float(rec.max()) <= 1
    assert torch.equal(tok.decode(codes.reshape(5, -1)), rec)  # flat square grid accepted
    with pytest.raises(ValueError, match="image size 62x62 is not divisible by the block size 4"):
        tok.encode(train_images[:1, :, :62, :62])
    with pytest.raises(ValueError, match=r"codes out of range \[0, 256\)"):
        tok.decode(torch.full((1, 16, 16), 256))


def test_encode_is_nearest_centroid(tok, train_images):
    x = train_images[::7]
    codes = tok.encode(x).flatten()
    blocks = image_blocks(x, 4).reshape(-1, 48).double()
    d = ((blocks[:, None, :] - tok.codebook.double()[None]) ** 2).sum(-1)
    assert torch.equal(codes, d.argmin(1))


def test_encode_independent_of_batch(tok, train_images):
    x = train_images[:12]
    one_by_one = torch.cat([tok.encode(x[i:i + 1]) for i in range(12)])
    assert torch.equal(one_by_one, tok.encode(x))


def test_decode_inverts_block_layout():
    # A codebook whose entries are distinct constant-per-channel blocks reconstructs exactly.
    cb = torch.linspace(-1, 1, 8)[:, None].repeat(1, 48)
    cb[:, 16:32] *= -1  # green channel differs, so a channel/pixel mix-up would show
    t = KMeansTokenizer(cb, block_size=4)
    codes = torch.randint(0, 8, (2, 5, 7), generator=torch.Generator().manual_seed(0))
    img = t.decode(codes)
    assert img.shape == (2, 3, 20, 28)
    assert torch.equal(t.encode(img), codes)


def test_reconstruction_psnr_on_held_out_images(tok):
    held = _images(seed=123, per_class=3)
    p = psnr(tok.decode(tok.encode(held)), held)
    assert p > 20.0, p
    # far better than predicting the mean colour of each image
    assert p > psnr(held.mean((2, 3), keepdim=True).expand_as(held), held) + 5


def test_fit_is_deterministic(train_images):
    a = fit_kmeans(image_blocks(train_images[:20], 4).reshape(-1, 48), 32, iters=3, seed=5)
    b = fit_kmeans(image_blocks(train_images[:20], 4).reshape(-1, 48), 32, iters=3, seed=5)
    c = fit_kmeans(image_blocks(train_images[:20], 4).reshape(-1, 48), 32, iters=3, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_save_load_round_trip(tok, train_images, tmp_path):
    path = str(tmp_path / "km.safetensors")
    tok.save(path, extra_metadata={"image_size": 64})
    loaded = KMeansTokenizer.load(path)
    assert torch.equal(loaded.codebook, tok.codebook) and loaded.block_size == 4
    assert loaded.metadata["image_size"] == "64"
    assert torch.equal(loaded.encode(train_images), tok.encode(train_images))
    via = load_tokenizer("kmeans", path)
    assert isinstance(via, KMeansTokenizer) and not via.training
    assert torch.equal(via.encode(train_images[:3]), tok.encode(train_images[:3]))


def test_load_errors(tmp_path):
    from safetensors.torch import save_file

    assert set(TOKENIZER_NAMES) == {"kmeans", "llamagen-vq16"}
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("vqgan", str(tmp_path / "x"))
    for name in TOKENIZER_NAMES:
        with pytest.raises(FileNotFoundError, match="not found"):
            load_tokenizer(name, str(tmp_path / "missing.safetensors"))
    other = str(tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a k-means tokenizer"):
        load_tokenizer("kmeans", other)


def test_fit_tokenizer_cli(tmp_path, capsys):
    generate_dataset(str(tmp_path / "img"), num_per_class=8, num_classes=3, progress=False)
    spec = importlib.util.spec_from_file_location("fit_tokenizer", os.path.join(ROOT, "tools", "fit_tokenizer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = str(tmp_path / "km.safetensors")
    assert mod.main(["--images", str(tmp_path / "img"), "--out", out, "--codebook-size", "64", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "held-out" in text and "dB" in text
    assert load_tokenizer("kmeans", out).vocab_size == 64
    assert mod.main(["--images", str(tmp_path / "img"), "--out", out, "--image-size", "62", "--quiet"]) == 2  # a user error: one line, exit 2
