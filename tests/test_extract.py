"""Code extraction end to end: preprocessing facts, shards, manifest, bad inputs, resume, torchrun."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dpar_scale.data.images import (center_crop_arr, five_crop, list_image_folder, load_rgb, make_views,
                                    pil_to_tensor, ten_crop, view_names)
from dpar_scale.data.shards import CodeShards, ShardError
from dpar_scale.data.side_arrays import open_side_array, write_side_manifest, write_side_shard
from dpar_scale.data.synthetic import generate_dataset, render_image
from dpar_scale.launch import free_port
from dpar_scale.tokenizer import load_tokenizer
from dpar_scale.tokenizer.kmeans import KMeansTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES, PER_CLASS = 3, 8


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


extract = _load_tool("extract_codes")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("extract")
    images = base / "images"
    generate_dataset(str(images), PER_CLASS, NUM_CLASSES, 64, seed=0, progress=False)
    x = torch.stack([pil_to_tensor(Image.open(p).convert("RGB")) for p, _ in list_image_folder(str(images))[1]])
    tok_path = base / "km.safetensors"
    KMeansTokenizer.fit(x, codebook_size=64, seed=0).save(str(tok_path))
    return {"base": base, "images": str(images), "tok": str(tok_path)}


def run(env, out, *extra, images=None, size=64):
    argv = ["--images", images or env["images"], "--out", str(out), "--tokenizer", "kmeans",
            "--tokenizer-path", env["tok"], "--image-size", str(size), "--num-workers", "0", "--quiet", *extra]
    return extract.main(argv)


def _files(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if f.startswith("shard_") and f.endswith(".npy")}


# ---------------------------------------------------------------------------------------------------------
# preprocessing facts (LlamaGen center_crop_arr / torchvision TenCrop)


def test_center_crop_arr_matches_adm_recipe():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    # reference, step by step: 200 >= 128 -> BOX halve to 150x100; 100 < 128 stop; BICUBIC to 96x64; crop x 16
    ref = img.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(ref)[:, 16:80])


def test_ten_crop_positions_and_order():
    arr = np.random.default_rng(1).integers(0, 256, (70, 70, 3), dtype=np.uint8)
    crops = [np.asarray(c) for c in ten_crop(Image.fromarray(arr), 64)]
    flip = arr[:, ::-1]
    expect = [arr[:64, :64], arr[:64, 6:], arr[6:, :64], arr[6:, 6:], arr[3:67, 3:67],
              flip[:64, :64], flip[:64, 6:], flip[6:, :64], flip[6:, 6:], flip[3:67, 3:67]]
    assert len(crops) == 10 and all(np.array_equal(a, b) for a, b in zip(crops, expect))
    # torchvision centre offset uses round-half-to-even: (281 - 256) / 2 = 12.5 -> 12
    big = np.arange(281 * 281 * 3, dtype=np.uint32).reshape(281, 281, 3) % 251
    centre = np.asarray(five_crop(Image.fromarray(big.astype(np.uint8)), 256)[4])
    assert np.array_equal(centre, big[12:268, 12:268].astype(np.uint8))
    assert view_names(True, False) == ["tl", "tr", "bl", "br", "center",
                                       "tl_flip", "tr_flip", "bl_flip", "br_flip", "center_flip"]


def test_make_views_counts_and_range():
    img = Image.fromarray(render_image(0, 0, 80))
    assert make_views(img, 64).shape == (1, 3, 64, 64)
    two = make_views(img, 64, flip=True)
    assert torch.equal(two[1], two[0].flip(-1))
    ten = make_views(img, 64, ten_crop=True)  # crop_size int(64 * 1.1) = 70
    assert ten.shape == (10, 3, 64, 64) and torch.equal(make_views(img, 64, ten_crop=True, flip=True), ten)
    assert torch.equal(ten[4], pil_to_tensor(five_crop(center_crop_arr(img, 70), 64)[4]))
    assert float(ten.min()) >= -1 and float(ten.max()) <= 1
    # exactly ToTensor + Normalize(0.5, 0.5)
    u8 = torch.from_numpy(np.asarray(center_crop_arr(img, 64)).copy()).permute(2, 0, 1)
    assert torch.equal(make_views(img, 64)[0], (u8.float() / 255 - 0.5) / 0.5)


def test_load_rgb_modes(tmp_path):
    rgb = render_image(3, 0, 64)
    rgba = np.concatenate([rgb, np.full((64, 64, 1), 7, np.uint8)], 2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(np.asarray(load_rgb(str(tmp_path / "a.png"))), rgb)  # alpha dropped, not composited
    Image.fromarray(rgb).convert("L").save(tmp_path / "l.png")
    assert load_rgb(str(tmp_path / "l.png")).mode == "RGB"
    Image.fromarray(rgb).quantize(16).save(tmp_path / "p.png")
    assert load_rgb(str(tmp_path / "p.png")).mode == "RGB"
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    assert load_rgb(str(tmp_path / "c.jpg")).mode == "RGB"
    g16 = np.array([[0, 257 * 128, 65535]], np.uint16).repeat(4, 0)
    Image.fromarray(g16).save(tmp_path / "g16.png")  # mode I;16; PIL's own convert would clip to 255
    out = np.asarray(load_rgb(str(tmp_path / "g16.png")))
    assert out.shape == (4, 3, 3) and out[0, :, 0].tolist() == [0, 128, 255]


# ---------------------------------------------------------------------------------------------------------
# extraction


@pytest.fixture(scope="module")
def fresh(env):
    out = env["base"] / "fresh"
    assert run(env, out, "--shard-size", "10", "--flip") == 0
    return out


def test_end_to_end_manifest_and_codes(env, fresh):
    m = json.loads((fresh / "manifest.json").read_text())
    n_img = NUM_CLASSES * PER_CLASS
    assert m["num_images"] == 2 * n_img and m["num_source_images"] == n_img and m["num_listed_images"] == n_img
    assert m["grid"] == [16, 16] and m["vocab_size"] == 64 and m["image_size"] == 64
    assert m["tokenizer"]["name"] == "kmeans" and len(m["tokenizer"]["sha256"]) == 64
    assert m["augmentation"]["copies_per_image"] == 2 and m["augmentation"]["flip"] is True
    assert m["num_classes"] == NUM_CLASSES and m["classes"] == ["00_disc", "01_square", "02_ring"]
    assert [s["count"] for s in m["shards"]] == [20, 20, 8] and m["skipped"] == []
    assert all(len(s["sha256"]["codes"]) == 64 for s in m["shards"])

    cs = CodeShards(str(fresh))
    assert len(cs) == 2 * n_img and cs.grid == (16, 16) and cs.vocab_size == 64 and cs.copies_per_image == 2
    cs.verify()
    tok = load_tokenizer("kmeans", env["tok"])
    _, samples = list_image_folder(env["images"])
    views = torch.cat([make_views(load_rgb(p), 64, flip=True) for p, _ in samples])
    expect = tok.encode(views).reshape(len(views), -1).numpy()
    assert cs.codes(slice(None)).dtype == np.uint16
    assert np.array_equal(cs.codes(slice(None)), expect)
    assert np.array_equal(cs.labels, np.repeat([lab for _, lab in samples], 2))
    assert np.array_equal(cs.source(slice(None)), np.stack([np.repeat(np.arange(n_img), 2),
                                                            np.tile([0, 1], n_img)], 1))
    # indexing across shard boundaries
    assert np.array_equal(cs.codes(slice(15, 25)), expect[15:25])
    assert np.array_equal(cs.codes(np.array([47, 0, 19, 20, -1])), expect[[47, 0, 19, 20, -1]])
    assert np.array_equal(cs.codes(21), expect[21]) and cs[21][1] == samples[10][1]
    assert np.array_equal(cs.codes(slice(40, 10, -3)), expect[40:10:-3])


@pytest.mark.parametrize("flags,copies", [((), 1), (("--ten-crop",), 10), (("--ten-crop", "--flip"), 10)])
def test_augmentation_multiplies_rows(env, flags, copies, tmp_path):
    assert run(env, tmp_path, "--shard-size", "16", *flags) == 0
    cs = CodeShards(str(tmp_path))
    assert len(cs) == copies * NUM_CLASSES * PER_CLASS and cs.copies_per_image == copies
    if copies == 10:
        tok = load_tokenizer("kmeans", env["tok"])
        _, samples = list_image_folder(env["images"])
        want = tok.encode(make_views(load_rgb(samples[17][0]), 64, ten_crop=True)).reshape(10, -1).numpy()
        assert np.array_equal(cs.codes(slice(170, 180)), want)
        assert cs.manifest["augmentation"]["views"][5] == "tl_flip"


def test_bad_and_unusual_images(env, tmp_path):
    img = tmp_path / "img"
    (img / "a").mkdir(parents=True)
    (img / "b").mkdir()
    (img / "empty_class").mkdir()
    rgb = render_image(7, 0, 64)
    Image.fromarray(np.concatenate([rgb, np.full((64, 64, 1), 0, np.uint8)], 2), "RGBA").save(img / "a/1_rgba.png")
    Image.fromarray(rgb).convert("L").save(img / "a/2_l.png")
    Image.fromarray(rgb).quantize(32).save(img / "a/3_p.png")
    Image.fromarray(rgb).resize((90, 70)).save(img / "a/4_upper.PNG")  # extension is case-insensitive
    (img / "a/notes.txt").write_text("not an image and not listed")
    good = img / "b/1_good.png"
    Image.fromarray(render_image(1, 0, 64)).save(good)
    data = good.read_bytes()
    (img / "b/2_truncated.png").write_bytes(data[: len(data) // 2])
    (img / "b/3_fake.jpg").write_text("this is text, not a JPEG")
    out = tmp_path / "codes"
    assert run(env, out, "--images", str(img), "--shard-size", "3") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_listed_images"] == 7 and m["num_source_images"] == 5 and m["num_images"] == 5
    assert m["classes"] == ["a", "b", "empty_class"] and m["num_classes"] == 3
    skipped = {os.path.basename(s["path"]): s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"2_truncated.png", "3_fake.jpg"} and all(skipped.values())
    cs = CodeShards(str(out))
    tok = load_tokenizer("kmeans", env["tok"])
    want = tok.encode(make_views(Image.fromarray(rgb), 64)).reshape(1, -1).numpy()
    assert np.array_equal(cs.codes(0)[None], want)  # RGBA with zero alpha: colour kept (converted)
    assert cs.labels.tolist() == [0, 0, 0, 0, 1]
    assert cs.source(slice(None))[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_resume_rebuilds_only_missing_shard(env, fresh, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(fresh, out)
    before = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    os.remove(out / "shard_00001.codes.npy")
    with pytest.raises(ShardError, match="shard_00001.codes.npy is missing"):
        CodeShards(str(out))
    assert run(env, out, "--shard-size", "10", "--flip") == 0
    after = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    for f in before:
        if f.startswith(("shard_00000", "shard_00002")):
            assert after[f] == before[f], f
    assert after["shard_00001.labels.npy"] != before["shard_00001.labels.npy"]
    assert _files(out) == _files(fresh)
    assert (out / "manifest.json").read_text().replace(str(out), "") == \
        (fresh / "manifest.json").read_text().replace(str(fresh), "")
    CodeShards(str(out)).verify()
    assert not [f for f in os.listdir(out) if ".tmp." in f]


def test_corrupt_and_truncated_shards_detected(env, fresh, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(fresh, out)
    path = out / "shard_00002.codes.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    cs = CodeShards(str(out))  # sizes still right: only the checksum can tell
    with pytest.raises(ShardError, match="shard_00002.codes.npy"):
        cs.verify()
    assert len(cs.verify(raise_on_error=False)) == 1
    # extraction notices the bad checksum and rebuilds exactly that shard
    assert run(env, out, "--shard-size", "10", "--flip") == 0
    CodeShards(str(out)).verify()
    assert _files(out) == _files(fresh)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match="shard_00002.codes.npy is truncated"):
        CodeShards(str(out))


def test_side_arrays_share_the_code_sharding(fresh, tmp_path):
    cs = CodeShards(str(fresh))
    side = tmp_path / "entropy"
    rng = np.random.default_rng(0)
    full = rng.random((len(cs), cs.seq_len)).astype(np.float16)
    for k in range(len(cs.shards)):
        lo, hi = cs.shard_range(k)
        write_side_shard(str(side), k, full[lo:hi], name="entropy")
    write_side_manifest(str(side), cs, name="entropy", extra={"model": "test"})
    arr = open_side_array(str(side), cs)
    assert len(arr) == len(cs) and arr.dtype == np.float16 and arr.manifest["model"] == "test"
    assert np.array_equal(arr[slice(None)], full) and np.array_equal(arr[[3, 41]], full[[3, 41]])
    assert arr.verify() == []
    bad = rng.random((5, cs.seq_len))
    write_side_shard(str(side), 0, bad, name="entropy")
    with pytest.raises(ShardError, match="missing or with wrong row count"):
        write_side_manifest(str(side), cs, name="entropy")


def test_errors(env, fresh, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    assert run(env, tmp_path / "o1", images=str(empty)) == 2
    assert "no images found" in capsys.readouterr().err
    assert run(env, tmp_path / "o2", images=str(tmp_path / "does-not-exist")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    assert run(env, tmp_path / "o2b", images=str(tmp_path / "bare")) == 2
    assert "no class folders" in capsys.readouterr().err
    corrupt_tok = tmp_path / "corrupt.safetensors"
    corrupt_tok.write_bytes(b"garbage" * 10)
    assert extract.main(["--images", env["images"], "--out", str(tmp_path / "o5"), "--tokenizer", "kmeans",
                         "--tokenizer-path", str(corrupt_tok), "--image-size", "64"]) == 2
    assert "cannot load the kmeans tokenizer" in capsys.readouterr().err
    assert run(env, tmp_path / "o3", size=62) == 2
    assert "not divisible" in capsys.readouterr().err
    assert extract.main(["--images", env["images"], "--out", str(tmp_path / "o4"), "--tokenizer", "kmeans",
                         "--tokenizer-path", str(tmp_path / "nope.safetensors"), "--image-size", "64"]) == 2
    assert "not found" in capsys.readouterr().err
    # resuming into a folder made with other settings is refused, and the folder is left alone
    out = tmp_path / "other"
    shutil.copytree(fresh, out)
    assert run(env, out, "--shard-size", "10", "--flip", size=32) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "image_size" in err
    assert run(env, out, "--shard-size", "10") == 2  # different augmentation
    assert "copies_per_image" in capsys.readouterr().err
    other_tok = tmp_path / "tok2.safetensors"
    KMeansTokenizer(torch.rand(32, 48) * 2 - 1).save(str(other_tok))
    assert extract.main(["--images", env["images"], "--out", str(out), "--tokenizer", "kmeans", "--quiet",
                         "--tokenizer-path", str(other_tok), "--image-size", "64", "--shard-size", "10",
                         "--flip"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert (out / "manifest.json").exists()
    CodeShards(str(out)).verify()


def test_torchrun_two_processes_match_one(env, fresh, tmp_path, capsys):
    port = free_port()
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(env, one, "--shard-size", "5", "--flip") == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), os.path.join(ROOT, "tools", "extract_codes.py"),
           "--images", env["images"], "--out", str(two), "--tokenizer", "kmeans", "--tokenizer-path", env["tok"],
           "--image-size", "64", "--flip", "--shard-size", "5", "--num-workers", "0", "--quiet"]
    envv = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=envv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 shards (5 built, 0 reused)" in proc.stdout
    assert _files(one) == _files(two)
    assert (one / "manifest.json").read_text().replace(str(one), "") == \
        (two / "manifest.json").read_text().replace(str(two), "")
    assert np.array_equal(CodeShards(str(two)).codes(slice(None)), CodeShards(str(fresh)).codes(slice(None)))
    # shards do not depend on the world size: a 1-process run resumes the 2-process folder
    os.remove(two / "shard_00003.labels.npy")
    capsys.readouterr()
    assert run(env, two, "--shard-size", "5", "--flip") == 0
    assert "5 shards (1 built, 4 reused)" in capsys.readouterr().out
    assert _files(one) == _files(two)


def test_llamagen_vq16_through_dispatch(env, tmp_path, capsys):
    from dpar_scale.tokenizer import vq16
    torch.manual_seed(0)
    path = str(tmp_path / "vq_random.pt")
    vq16.save_llamagen_format(vq16.VQ16Tokenizer(), path)  # random weights in LlamaGen's checkpoint layout
    base = ["--images", env["images"], "--tokenizer", "llamagen-vq16", "--tokenizer-path", path,
            "--num-workers", "0", "--quiet", "--flip", "--shard-size", "100", "--batch-size", "64"]
    assert extract.main([*base, "--out", str(tmp_path / "bad"), "--image-size", "40"]) == 2
    assert "not divisible by the llamagen-vq16 tokenizer's downsampling factor 16" in capsys.readouterr().err
    out = tmp_path / "codes"
    assert extract.main([*base, "--out", str(out), "--image-size", "32"]) == 0
    cs = CodeShards(str(out))
    assert cs.grid == (2, 2) and cs.vocab_size == 16384 and cs.tokenizer["name"] == "llamagen-vq16"
    tok = load_tokenizer("llamagen-vq16", path)
    assert tok.name == "llamagen-vq16" and tok.downsample == 16
    _, samples = list_image_folder(env["images"])
    views = torch.cat([make_views(load_rgb(p), 32, flip=True) for p, _ in samples])
    assert np.array_equal(cs.codes(slice(None)), tok.encode(views).reshape(len(views), -1).numpy())
