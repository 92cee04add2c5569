"""Captions beside the codes: caption files, extraction with captions (1 and 2 processes, resume), caption choice as a
function of (seed, epoch, sample), ragged text batches, and every bad input (a clear error or a counted outcome)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dpar_scale.config import ConfigError
from dpar_scale.data.caption_shards import CaptionShards
from dpar_scale.data.captions import CaptionFileError, caption_choice, read_caption_file
from dpar_scale.data.images import list_image_folder, pil_to_tensor
from dpar_scale.data.loader import BatchSource, CodeData, GlobalOrder, TextSource, ragged_text, rank_slice
from dpar_scale.data.shards import ShardError
from dpar_scale.data.synthetic import generate_dataset
from dpar_scale.errors import MissingFileError
from dpar_scale.text import train_text_tokenizer
from dpar_scale.tokenizer.kmeans import KMeansTokenizer

from sampling_fixtures import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = "5"  # 12 images -> shards of 5, 5, 2 images (10, 10, 4 rows with --flip)


extract = load_tool("extract_codes")


def write_captions(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("captions")
    images = base / "images"
    generate_dataset(str(images), 4, 3, 32, seed=0, progress=False, captions_per_image=0)
    samples = list_image_folder(str(images))[1]
    x = torch.stack([pil_to_tensor(Image.open(p).convert("RGB")) for p, _ in samples])
    KMeansTokenizer.fit(x, codebook_size=16, seed=0).save(str(base / "km.safetensors"))
    names = [os.path.relpath(p, images).replace(os.sep, "/") for p, _ in samples]
    # image 0: three captions; 1: one, named by absolute path; 2: none; 3: only an empty one; the rest: two each
    lines = [{"path": names[0], "caption": f"caption {k} of image zero"} for k in range(3)]
    lines += [{"path": samples[1][0], "caption": "  image one, named by its absolute path  "},
              {"path": names[3], "caption": "   "}]
    lines += [{"path": n, "caption": f"{n} says {word}"} for n in names[4:] for word in ("hello", "ünïcödé ✓")]
    captions = write_captions(base / "captions.jsonl", lines)
    return {"base": base, "images": str(images), "tok": str(base / "km.safetensors"), "names": names,
            "captions": captions, "samples": samples}


def run(env, out, *extra):
    argv = ["--images", env["images"], "--out", str(out), "--tokenizer", "kmeans", "--tokenizer-path", env["tok"],
            "--image-size", "32", "--num-workers", "0", "--quiet", "--flip", "--shard-size", SHARD, *extra]
    return extract.main(argv)


def expected(env, image):
    """The captions image `image` should have (what the caption file says, stripped, empty ones left out)."""
    name = env["names"][image]
    if image == 0:
        return [f"caption {k} of image zero" for k in range(3)]
    if image == 1:
        return ["image one, named by its absolute path"]
    if image in (2, 3):
        return []
    return [f"{name} says hello", f"{name} says ünïcödé ✓"]


@pytest.fixture(scope="module")
def fresh(env):
    out = env["base"] / "fresh"
    assert run(env, out, "--captions", env["captions"]) == 0
    return out


def caption_files(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder)) if f.startswith("shard_")}


def same_manifest(a, b):
    return (a / "manifest.json").read_text().replace(str(a.parent), "") == \
        (b / "manifest.json").read_text().replace(str(b.parent), "")


def test_extraction_keeps_every_views_captions(env, fresh, capsys):
    caps = CaptionShards(str(fresh / "captions"))
    assert len(caps) == 24
    for image in range(12):
        for view in (0, 1):  # both views of an image share its captions
            assert caps.captions(2 * image + view) == expected(env, image), (image, view)
    m = caps.manifest
    assert m["uncaptioned"] == [env["names"][2], env["names"][3]] and m["num_uncaptioned_images"] == 2
    assert m["empty_captions"] == [f"{env['captions']}:5"] and m["num_empty_captions"] == 1
    assert (m["num_images"], m["num_captioned_images"], m["num_captions"], m["max_captions_per_image"]) == \
        (12, 10, 20, 3)
    assert m["num_unmatched_captions"] == 0 and m["num_captions_of_skipped_images"] == 0
    assert [s["count"] for s in m["shards"]] == [10, 10, 4] and caps.verify() == []
    data = CodeData.open(str(fresh), need_captions=True)
    assert data.identity()["captions_fingerprint"] == caps.fingerprint
    assert data.choose_captions(np.array([4, 5, 6]), 0, seed=0)[:2] == ["", ""]  # image 2: uncaptioned


def test_two_processes_match_one_and_resume_rebuilds_only_what_changed(env, fresh, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), os.path.join(ROOT, "tools", "extract_codes.py"),
           "--images", env["images"], "--out", str(two), "--tokenizer", "kmeans", "--tokenizer-path", env["tok"],
           "--image-size", "32", "--flip", "--shard-size", SHARD, "--num-workers", "0", "--quiet",
           "--captions", env["captions"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 caption shards (3 built, 0 reused)" in proc.stdout
    assert caption_files(two / "captions") == caption_files(fresh / "captions")
    assert same_manifest(two / "captions", fresh / "captions")

    # a lost caption shard: only it is rebuilt (by one process now), identical; no image is re-encoded
    before = {f: os.stat(two / f).st_mtime_ns for f in os.listdir(two) if f.startswith("shard_")}
    os.remove(two / "captions" / "shard_00001.caption_bytes.npy")
    capsys.readouterr()
    assert run(env, two, "--captions", env["captions"]) == 0
    out = capsys.readouterr().out
    assert "(0 built, 3 reused)" in out and "3 caption shards (1 built, 2 reused)" in out
    assert caption_files(two / "captions") == caption_files(fresh / "captions")
    assert {f: os.stat(two / f).st_mtime_ns for f in before} == before

    # a changed caption file: captions rebuilt, codes kept; the new caption is there
    lines = [json.loads(x) for x in open(env["captions"])] + [{"path": env["names"][2], "caption": "now captioned"}]
    changed = write_captions(tmp_path / "changed.jsonl", lines)
    assert run(env, two, "--captions", changed) == 0
    out = capsys.readouterr().out
    assert "(0 built, 3 reused)" in out and "(3 built, 0 reused)" in out
    assert CaptionShards(str(two / "captions")).captions(4) == ["now captioned"]


def test_captions_added_to_a_finished_folder_reuse_every_code_shard(env, tmp_path, capsys):
    out = tmp_path / "codes"
    assert run(env, out) == 0
    assert not (out / "captions").exists()
    with pytest.raises(MissingFileError, match="--captions CAPTIONS.jsonl"):
        CodeData.open(str(out), need_captions=True)
    capsys.readouterr()
    assert run(env, out, "--captions", env["captions"]) == 0
    assert "3 shards (0 built, 3 reused)" in capsys.readouterr().out
    assert CaptionShards(str(out / "captions")).captions(0) == expected(env, 0)


def test_caption_choice_is_a_function_of_seed_epoch_and_sample():
    ids, counts = np.arange(3000), np.full(3000, 3)
    a = caption_choice(7, 0, ids, counts)
    assert np.array_equal(a, caption_choice(7, np.zeros(3000, np.int64), ids, counts))
    assert np.array_equal(a[1000:1500], caption_choice(7, 0, ids[1000:1500], counts[1000:1500]))  # any split
    assert ((a >= 0) & (a < 3)).all() and all(0.29 < (a == k).mean() < 0.38 for k in range(3))
    changed = (caption_choice(7, 1, ids, counts) != a).mean()
    assert 0.6 < changed < 0.73  # a new epoch draws again: 2/3 change for three captions
    assert (caption_choice(8, 0, ids, counts) != a).mean() > 0.6  # and per seed
    mixed = caption_choice(7, 0, ids[:4], np.array([0, 1, 2, 0]))
    assert mixed[0] == -1 and mixed[3] == -1 and mixed[1] == 0 and mixed[2] in (0, 1)


def test_text_batches_follow_the_cursor_on_any_layout(env, fresh):
    data = CodeData.open(str(fresh), need_captions=True)
    tok = train_text_tokenizer([c for i in range(12) for c in expected(env, i)] * 3, 40)
    source = BatchSource(data, None, TextSource(tok, max_length=12, seed=3))
    order = GlobalOrder(data.train_ids, seed=3)
    n = len(order)
    cursor, size = n - 4, 8  # crosses an epoch boundary
    ids, epochs = order.ids(cursor, size), order.epochs(cursor, size)
    assert epochs.tolist() == [0] * 4 + [1] * 4
    whole = source.make(ids, epochs=epochs)
    halves = [source.make(rank_slice(ids, r, 2), epochs=rank_slice(epochs, r, 2)) for r in (0, 1)]
    assert sum((h.captions for h in halves), []) == whole.captions
    assert torch.equal(torch.cat([h.text_ids for h in halves]), whole.text_ids)
    assert int(whole.text_lengths.sum()) == len(whole.text_ids) and len(whole.text_lengths) == size
    # a run resumed at the cursor (new objects) sees the same captions
    again = BatchSource(data, None, TextSource(tok, 12, 3)).make(GlobalOrder(data.train_ids, 3).ids(cursor, size),
                                                                 epochs=epochs)
    assert again.captions == whole.captions and torch.equal(again.text_ids, whole.text_ids)
    # each caption is one of its row's, its ids are the tokenizer's (eos last), truncation is counted
    ends = torch.cumsum(whole.text_lengths, 0)
    truncated = 0
    for i, (row, caption) in enumerate(zip(ids, whole.captions)):
        assert caption in (data.captions.captions(int(row)) or [""])
        want = tok.encode(caption)
        truncated += len(want) > 12
        want = want if len(want) <= 12 else want[:11] + [tok.eos_id]
        assert whole.text_ids[int(ends[i]) - len(want):int(ends[i])].tolist() == want
    assert whole.text_truncated == truncated > 0
    # uncaptioned rows (image 2: rows 4, 5) give the empty caption, [eos]
    empty = source.make(np.array([4, 5]), epochs=0)
    assert empty.captions == ["", ""] and empty.text_ids.tolist() == [tok.eos_id] * 2
    # characters the tokenizer cannot spell are counted (sentencepiece makes a run of them one unk)
    assert ragged_text(tok, ["日本", "a 日"], 12)[3] == 2
    with pytest.raises(ValueError, match="needs the epoch of each sample"):
        source.make(ids)
    with pytest.raises(ConfigError, match="needs captions beside the codes"):
        BatchSource(CodeData.open(str(fresh)), None, TextSource(tok, 12, 0))


@pytest.mark.parametrize("line, message", [
    ('{"path": "a.png", "caption": "x"', "not valid JSON"),
    ('["a.png", "x"]', "a JSON list, not an object"),
    ('{"caption": "x"}', '"path" is missing'),
    ('{"path": "a.png", "caption": 3}', '"caption" is a int; it must be a string'),
    ('{"path": " ", "caption": "x"}', '"path" is empty'),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"path": "ok.png", "caption": "fine"}\n\n' + line + "\n")
    with pytest.raises(CaptionFileError, match=rf"c\.jsonl:3: .*{message}"):
        read_caption_file(str(path))


def test_unreadable_or_unmatched_caption_files(env, tmp_path, capsys):
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes('{"path": "a.png", "caption": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(CaptionFileError, match=r"latin1\.jsonl:1: not UTF-8"):
        read_caption_file(str(raw))
    assert run(env, tmp_path / "o1", "--captions", str(tmp_path / "missing.jsonl")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run(env, tmp_path / "o1", "--allow-unmatched-captions") == 2
    assert "give --captions FILE too" in capsys.readouterr().err
    bom = tmp_path / "bom.jsonl"  # as some editors save UTF-8
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"path": "a.png", "caption": "fine"}\n')
    assert read_caption_file(str(bom))[0].caption == "fine"
    lines = [{"path": env["names"][0], "caption": "fine"}, {"path": "00_disc/99999.png", "caption": "no such image"},
             {"path": "images/" + env["names"][1], "caption": "wrong root"}]
    bad = write_captions(tmp_path / "unmatched.jsonl", lines)
    assert run(env, tmp_path / "o2", "--captions", bad) == 2
    err = capsys.readouterr().err
    assert "2 of 3 caption lines name no image" in err and f"{bad}:2: '00_disc/99999.png'" in err
    assert "--allow-unmatched-captions" in err and not (tmp_path / "o2").exists()  # failed before encoding
    assert run(env, tmp_path / "o3", "--captions", bad, "--allow-unmatched-captions") == 0
    m = json.loads((tmp_path / "o3" / "captions" / "manifest.json").read_text())
    assert m["num_unmatched_captions"] == 2 and m["unmatched_captions"][0] == {"line": f"{bad}:2",
                                                                               "path": "00_disc/99999.png"}
    assert m["num_uncaptioned_images"] == 11 and "lines matching no image" in capsys.readouterr().out


def _rewrite(folder, key, edit):
    """Caption shard 0's `key` file rewritten by `edit`, its sha256 updated: data written bad in the first place."""
    from dpar_scale.data.shards import save_npy_atomic, write_manifest

    m = json.loads((folder / "manifest.json").read_text())
    name = m["shards"][0]["files"][key]
    array = edit(np.load(folder / name).copy())
    m["shards"][0]["sha256"][key] = save_npy_atomic(str(folder / name), array)
    if key == "bytes":
        m["shards"][0]["num_bytes"] = int(array.size)
    write_manifest(str(folder), m)


@pytest.mark.parametrize("damage, message", [
    ("flip", r"shard_00000\.caption_bytes\.npy does not match the sha256"),
    ("rows", r"caption_rows\.npy: row 3 names captions .* outside the shard's"),
    ("utf8", r"caption_bytes\.npy: caption 0 is not UTF-8"),
    ("offsets", r"caption offsets must rise strictly"),
])
def test_damaged_caption_shards_fail_at_open(fresh, tmp_path, damage, message):
    codes = tmp_path / "codes"
    shutil.copytree(fresh, codes)
    caps = codes / "captions"
    if damage == "flip":
        path = caps / "shard_00000.caption_bytes.npy"
        data = bytearray(path.read_bytes())
        data[-2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "rows":
        _rewrite(caps, "rows", lambda r: r + np.array([[0, 0]] * 3 + [[40, 0]] + [[0, 0]] * (len(r) - 4)))
    elif damage == "utf8":
        _rewrite(caps, "bytes", lambda b: np.concatenate([np.array([0xFF], np.uint8), b[1:]]))
    else:
        _rewrite(caps, "offsets", lambda o: o[::-1].copy())
    with pytest.raises(ShardError, match=message) as info:
        CodeData.open(str(codes), need_captions=True)
    assert "--captions" in str(info.value) or damage == "flip"


def test_captions_of_other_codes_are_refused(env, fresh, tmp_path):
    other = tmp_path / "other"
    assert run(env, other) == 0  # the same images at the same settings: the same codes (same fingerprint) ...
    shutil.copytree(fresh / "captions", other / "captions")
    CodeData.open(str(other), need_captions=True)
    manifest = json.loads((other / "captions" / "manifest.json").read_text())
    manifest["codes_fingerprint"] = "0" * 64  # ... so pretend they were re-extracted from something else
    (other / "captions" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="belong to other code shards .* --captions"):
        CodeData.open(str(other), need_captions=True)
