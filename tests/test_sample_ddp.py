"""tools/sample_ddp.py: the evaluation set does not depend on the world size (2 ranks == 1, byte for byte), a
killed run resumes on another world size to the same bytes, chunks from other settings are refused, the npz
and meta.json hold what the evaluator and the user need; labels are balanced, shuffled and a function of the seed.

Tiny random-weight models (the shapes of tests/test_generate.py) behind the same manifests a trained run writes.
"""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

from dpar_scale.models import DPAR, GPT
from dpar_scale.patching.entropy import code_entropies
from dpar_scale.sampling.streams import sample_labels
from parallel_helpers import kill_hard, start_torchrun, torchrun
from sampling_fixtures import load_tool, randomize, write_sampling_setup

GRID, VOCAB, CLASSES = (6, 6), 48, 5
COMMON = dict(dim=64, n_heads=4, vocab_size=VOCAB, grid=GRID, multiple_of=32)
RUN = ["--num-samples", "40", "--batch-size", "2", "--cfg-scale", "2.0", "--seed", "3", "--top-k", "30",
       "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_ddp")
    entropy = randomize(GPT(n_layers=2, num_classes=0, **COMMON), 1, scale=0.15)
    codes = torch.randint(0, VOCAB, (16, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(3))
    theta = float(code_entropies(entropy, codes).median())  # boundaries both fire and stay quiet
    paths = write_sampling_setup(
        root, gpt=randomize(GPT(n_layers=2, num_classes=CLASSES, **COMMON), 0), entropy=entropy,
        dpar=randomize(DPAR(n_encoder_layers=1, n_global_layers=2, n_decoder_layers=1, num_classes=CLASSES,
                            **COMMON), 2),
        grid=GRID, vocab=VOCAB, classes=CLASSES, theta=theta)
    return {"root": root, "theta": theta, **paths}


@pytest.fixture(scope="module")
def reference(setup):
    """One process, in this process: the DPAR run every other run must reproduce byte for byte."""
    out = setup["root"] / "ref"
    assert load_tool("sample_ddp").main(["--checkpoint", str(setup["dpar"]), "--out", str(out)] + RUN) == 0
    return out


def _args(setup, out, *extra):
    return ["tools/sample_ddp.py", "--checkpoint", str(setup["dpar"]), "--out", str(out), *RUN, *extra]


def test_two_ranks_write_the_bytes_of_one(setup, reference):
    out = setup["root"] / "two"
    proc = torchrun(2, _args(setup, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["images_generated"] == 40 and meta["chunks_resumed"] == 0

    # The ADM layout, and what meta.json says about the run.
    with np.load(reference / "samples.npz") as f:
        assert sorted(f.files) == ["arr_0", "labels"]
        images, labels = f["arr_0"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (40, 12, 12, 3)  # k-means tokenizer: 2x2 blocks per code
    assert labels.dtype == np.int64 and labels.tolist() == sample_labels(3, 40, CLASSES).tolist()
    assert len({im.tobytes() for im in images}) == 40  # every sample its own image
    ref_meta = json.loads((reference / "meta.json").read_text())
    assert ref_meta["settings"] == meta["settings"] and ref_meta["world_size"] == 1
    s = meta["settings"]
    assert (s["seed"], s["cfg_scale"], s["top_k"], s["batch_size"], s["labels"], s["precision"]) == \
        (3, 2.0, 30, 2, "balanced", "fp32")
    assert s["patch_rule"] == {"mode": "global", "alignment": "reference", "threshold": setup["theta"],
                               "max_patch_length": 4, "static_length": 2, "row_reset": True,
                               "relative_threshold": 0.0}
    assert meta["sources"]["checkpoint"] == str(setup["dpar"]) and meta["images_per_second"] > 0
    dpar = meta["dpar"]
    # Mean patch length = codes / patches, from the patch counts the chunks recorded.
    counts = np.concatenate([np.load(p)["num_patches"] for p in sorted((reference / "chunks").glob("*.npz"))])
    assert dpar["mean_patch_length"] == pytest.approx(36 / counts.mean()) and 1 < dpar["mean_patch_length"] < 4
    assert dpar["global_positions_per_image"] == pytest.approx(counts.mean())  # class + all patches but the last
    assert dpar["global_positions_per_image_training_layout"] == pytest.approx(counts.mean() + 1)


def test_resume_after_kill_on_another_world_size(setup, reference):
    out = setup["root"] / "killed"
    proc = start_torchrun(2, _args(setup, out), setup["root"] / "killed.log")
    deadline = time.monotonic() + 120
    while not list((out / "chunks").glob("chunk-*.npz")):
        assert proc.poll() is None, (setup["root"] / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no chunk written within 120 s"
        time.sleep(0.005)
    kill_hard(proc)  # SIGKILL to torchrun and both workers: no clean exit
    written = len(list((out / "chunks").glob("chunk-*.npz")))
    assert 1 <= written < 20 and not (out / "samples.npz").exists()

    sample_ddp = load_tool("sample_ddp")
    assert sample_ddp.main(["--checkpoint", str(setup["dpar"]), "--out", str(out)] + RUN) == 0  # 1 process now
    assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["chunks_resumed"] >= written and meta["images_generated"] == 40 - 2 * meta["chunks_resumed"]


def test_damaged_chunks_are_generated_again(setup, reference, capsys):
    out = setup["root"] / "damaged"
    shutil.copytree(reference / "chunks", out / "chunks")
    torn = out / "chunks" / "chunk-000004.npz"
    torn.write_bytes(torn.read_bytes()[:300])  # truncated: unreadable
    (out / "chunks" / "chunk-000009.npz").unlink()
    (out / "chunks" / ".chunk-000009.npz.tmp-123").write_bytes(b"partial write")  # a kill during a write
    assert load_tool("sample_ddp").main(["--checkpoint", str(setup["dpar"]), "--out", str(out)] + RUN) == 0
    assert "chunk-000004.npz is incomplete or unreadable" in capsys.readouterr().out
    assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()
    assert json.loads((out / "meta.json").read_text())["images_generated"] == 4
    assert not list((out / "chunks").glob(".chunk-*"))


def test_output_from_other_settings_is_refused(setup, reference, capsys):
    sample_ddp = load_tool("sample_ddp")
    # A chunk from a run with another guidance scale is not reused.
    other = setup["root"] / "other-cfg"
    assert sample_ddp.main(["--checkpoint", str(setup["dpar"]), "--out", str(other), "--num-samples", "6"]
                           + RUN + ["--num-samples", "6", "--cfg-scale", "1.5"]) == 0  # the last flag wins
    mixed = setup["root"] / "mixed"
    shutil.copytree(reference / "chunks", mixed / "chunks")
    shutil.copy(other / "chunks" / "chunk-000002.npz", mixed / "chunks" / "chunk-000002.npz")
    assert sample_ddp.main(["--checkpoint", str(setup["dpar"]), "--out", str(mixed)] + RUN) == 2
    err = capsys.readouterr().err
    assert "chunk-000002.npz was written with other settings (cfg_scale: recorded 1.5, now 2.0; num_samples: " \
        "recorded 6, now 40)" in err
    assert "sample into another --out" in err and not (mixed / "samples.npz").exists()
    # Nor is a finished folder overwritten by a run with another patch rule.
    before = (reference / "samples.npz").read_bytes()
    assert sample_ddp.main(["--checkpoint", str(setup["dpar"]), "--out", str(reference), "--threshold", "9"]
                           + RUN) == 2
    assert "already holds samples made with other settings (patch_rule.threshold: recorded" in \
        capsys.readouterr().err
    assert (reference / "samples.npz").read_bytes() == before


def test_gpt_resize_per_class_png_and_rank_images(setup, capsys):
    # GPT, --per-class labels, --resize (bicubic on the float decoder output, then uint8), --png; and the
    # library entry point that an in-process evaluation reads the images from.
    import torch.nn.functional as F
    from PIL import Image

    from dpar_scale.tokenizer.kmeans import KMeansTokenizer

    sample_ddp = load_tool("sample_ddp")
    out = setup["root"] / "gpt"
    args = sample_ddp.parse_args(["--checkpoint", str(setup["gpt"]), "--out", str(out), "--num-samples", "10",
                                  "--batch-size", "4", "--per-class", "--resize", "16", "--png", "--no-progress"])
    result = sample_ddp.run(args)
    meta = result.meta
    assert "dpar" not in meta and meta["resize"]["size"] == 16 and "bicubic" in meta["resize"]["method"]
    with np.load(result.samples_path) as f:
        images, labels = f["arr_0"], f["labels"]
    assert images.shape == (10, 16, 16, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    tok = KMeansTokenizer.load(str(setup["tokenizer"]))
    codes = torch.from_numpy(np.load(out / "chunks" / "chunk-000001.npz")["codes"]).view(-1, *GRID)
    expect = F.interpolate(tok.decode(codes), size=(16, 16), mode="bicubic", align_corners=False)
    expect = ((expect.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(images[4:8], expect)
    assert np.array_equal(np.asarray(Image.open(out / "png" / "000007.png")), images[7])
    chunks = list(result.iter_rank_images())  # one rank: every chunk, in order
    assert np.array_equal(np.concatenate([c[2] for c in chunks]), images)
    assert np.concatenate([c[0] for c in chunks]).tolist() == list(range(10))
    # A patch rule for a GPT is an error.
    assert sample_ddp.main(["--checkpoint", str(setup["gpt"]), "--out", str(out), "--threshold", "5"]) == 2
    assert "apply to DPAR checkpoints only" in capsys.readouterr().err


def test_labels_balanced_shuffled_and_a_function_of_the_seed():
    a = sample_labels(0, 50_000, 1000)
    assert a.dtype == np.int64 and np.bincount(a, minlength=1000).tolist() == [50] * 1000
    assert np.array_equal(a, sample_labels(0, 50_000, 1000)) and not np.array_equal(a, sample_labels(1, 50_000, 1000))
    # Shuffled: every IS split of 5,000 holds most classes (sorted labels would give 100 classes per split).
    assert all(len(np.unique(split)) > 900 for split in a.reshape(10, 5000))
    uneven = sample_labels(0, 10, 4)
    assert np.bincount(uneven).tolist() == [3, 3, 2, 2]
    assert sample_labels(0, 10, 4, "per-class").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    rnd = sample_labels(0, 50_000, 1000, "random")
    assert np.array_equal(rnd, sample_labels(0, 50_000, 1000, "random")) and rnd.min() >= 0 and rnd.max() < 1000
    assert not np.array_equal(np.bincount(rnd, minlength=1000), np.full(1000, 50))  # independent draws
    assert np.array_equal(sample_labels(0, 100, 1000, "random"), rnd[:100])  # label i depends on (seed, i) only
    with pytest.raises(ValueError, match="label mode 'sorted' is not one of"):
        sample_labels(0, 10, 4, "sorted")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_evaluate_in_the_same_job(setup, reference, tmp_path):
    # --evaluate: the finished set (resumed here: every chunk exists) is judged in the same process group, and
    # DIR/metrics.json holds what tools/evaluate.py's library call gives for the same files.
    from dpar_scale.evaluation import evaluate_samples
    from test_evaluation import StandInDomain, images, script

    detector = script(StandInDomain(classes=CLASSES), tmp_path / "domain.pt")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=images(24, seed=5, size=24))
    args = ["--checkpoint", str(setup["dpar"]), "--out", str(reference), *RUN, "--evaluate", "--reference",
            str(ref), "--features", f"domain:{detector}", "--eval-batch-size", "7", "--no-cache"]
    assert load_tool("sample_ddp").main(args) == 0
    got = json.loads((reference / "metrics.json").read_text())
    want = evaluate_samples(str(reference / "samples.npz"), str(ref), f"domain:{detector}", batch_size=7,
                            use_cache=False, progress=False)
    assert got["num_samples"] == 40 and got["num_reference"] == 24
    for key in ("fid_domain", "precision", "recall", "class_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    # Without a detector, --evaluate fails before sampling starts.
    assert load_tool("sample_ddp").main(["--checkpoint", str(setup["dpar"]), "--out", str(tmp_path / "x"), *RUN,
                                         "--evaluate"]) == 2
    assert not (tmp_path / "x").exists()
