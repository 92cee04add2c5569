"""Evaluation inputs and plumbing: the npz / ImageFolder inputs, the reference cache, the detectors (stand-in
TorchScript modules with the real signatures), tools/evaluate.py, and 2 ranks == 1 rank. The statistics themselves
(FID, IS, precision / recall against independent formulas) are tests/test_evaluation_statistics.py."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dpar_scale.data.images import center_crop_arr
from dpar_scale.evaluation import (
    EvaluationError, evaluate_samples, extract_features, fid_statistics, frechet_distance, load_detector, open_images,
    precision_recall,
)
from dpar_scale.evaluation.sources import FolderImages, NpzImages
from test_evaluation_statistics import fid_reference, is_reference
from tests.parallel_helpers import REPO, run_env, torchrun

# the stand-in detectors are TorchScript files like the real one; torch marks torch.jit.script deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# ---- stand-in detectors: tiny TorchScript modules with the real files' forward signatures ----

class StandInInception(torch.nn.Module):
    """forward(img, return_features, use_fp16, no_output_bias) like inception-2015-12-05.pt, resizing internally."""

    def __init__(self, dim: int = 8, classes: int = 10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 8 * 8, dim, generator=g) / 4)
        self.output = torch.nn.Linear(dim, classes)
        with torch.no_grad():
            self.output.weight.copy_(torch.randn(classes, dim, generator=g) * 3)
            self.output.bias.copy_(torch.randn(classes, generator=g))

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = F.interpolate(img.float() / 255, size=(8, 8), mode="bilinear", align_corners=False)
        f = torch.tanh(x.flatten(1) @ self.proj)
        if return_features:
            return f
        logits = F.linear(f, self.output.weight) if no_output_bias else self.output(f)
        return torch.softmax(logits, 1)


class StandInDomain(torch.nn.Module):
    """forward(img) -> (features, logits): the domain detector's interface."""

    def __init__(self, dim: int = 6, classes: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, dim, generator=g) / 3)
        self.head = torch.nn.Parameter(torch.randn(dim, classes, generator=g) * 2)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.adaptive_avg_pool2d(img.float() / 255, 4).flatten(1)
        f = torch.tanh(x @ self.proj)
        return f, f @ self.head


class WrongSignature(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().flatten(1)


class WrongOutput(torch.nn.Module):
    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        return img.float().mean((1, 2, 3))  # 1-D: not [batch, features]


def script(module: torch.nn.Module, path) -> str:
    torch.jit.script(module).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def inception_pt(tmp_path_factory):
    return script(StandInInception(), tmp_path_factory.mktemp("det") / "inception-standin.pt")


def images(n: int, seed: int, size: int = 16, high: int = 256) -> np.ndarray:
    """Blurry random images: smooth enough that the stand-in's 8x8 resize keeps them apart."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, high, (n, 4, 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(small, size // 4, 1), size // 4, 2).astype(np.uint8)


# ---- inputs ----

def test_npz_layout_checks(tmp_path):
    good = images(6, 0)
    np.savez(tmp_path / "plain.npz", arr_0=good, labels=np.arange(6))
    np.savez_compressed(tmp_path / "packed.npz", arr_0=good)
    plain, packed = NpzImages(tmp_path / "plain.npz"), NpzImages(tmp_path / "packed.npz")
    assert plain._mmap is not None and packed._mmap is None  # memory-mapped vs streamed
    for src in (plain, packed):
        np.testing.assert_array_equal(src.read(3, 6), good[3:6])
        np.testing.assert_array_equal(src.read(0, 2), good[0:2])  # backwards: the stream re-opens
    np.testing.assert_array_equal(plain.labels, np.arange(6))
    cases = {
        "no_arr0.npz": (dict(images=good), r"no arr_0 in this npz \(it holds images\)"),
        "float.npz": (dict(arr_0=good.astype(np.float32) / 255), r"float32 \[6, 16, 16, 3\].*np.rint"),
        "gray.npz": (dict(arr_0=good[..., 0]), r"uint8 \[6, 16, 16\]; arr_0 must hold uint8 \[N, H, W, 3\]"),
        "one.npz": (dict(arr_0=good[:1]), r"holds 1 image\(s\); FID needs at least 2"),
        "labels.npz": (dict(arr_0=good, labels=np.arange(5)), r"labels are int64 \[5\]; expected integers \[6\]"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(EvaluationError, match=message):
            NpzImages(tmp_path / name)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((tmp_path / "plain.npz").read_bytes()[:1000])
    with pytest.raises(EvaluationError, match="truncated.npz: not a readable npz file"):
        NpzImages(truncated)
    with pytest.raises(EvaluationError, match="missing.npz: no such file or folder"):
        open_images(tmp_path / "missing.npz", what="reference")


def test_image_folder_is_centre_cropped_like_adm(tmp_path):
    rng = np.random.default_rng(7)
    pictures = []
    for cls, (h, w) in enumerate([(20, 28), (40, 33), (16, 16)]):
        (tmp_path / "ref" / f"c{cls}").mkdir(parents=True)
        pic = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        pic.save(tmp_path / "ref" / f"c{cls}" / "a.png")
        pictures.append(np.asarray(center_crop_arr(pic, 16)))
    src = open_images(tmp_path / "ref", image_size=16, what="reference")
    assert isinstance(src, FolderImages) and src.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(src.read(0, 3), np.stack(pictures))
    np.testing.assert_array_equal(src.read(2, 3)[0], pictures[2])  # already 16x16: unchanged


def test_image_folder_reference_cache_follows_its_files(tmp_path, inception_pt):
    for i in range(6):
        (tmp_path / "ref" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images(1, 30 + i, size=24)[0]).save(tmp_path / "ref" / f"c{i % 2}" / f"{i}.png")
    det = load_detector(f"inception:{inception_pt}")
    calls = counting(det)
    first = evaluate_samples(images(8, 36), tmp_path / "ref", det, batch_size=4, progress=False)
    assert first["reference_cache"] == str(tmp_path / f"ref.stats-{det.sha256[:16]}-16px.npz")
    assert first["num_reference"] == 6 and not first["reference_from_cache"]
    assert evaluate_samples(images(8, 36), tmp_path / "ref", det, batch_size=4, progress=False)["reference_from_cache"]
    picture = tmp_path / "ref" / "c0" / "0.png"
    Image.fromarray(images(1, 40, size=24)[0]).save(picture)  # same name, new content and mtime
    calls.clear()
    again = evaluate_samples(images(8, 36), tmp_path / "ref", det, batch_size=4, progress=False)
    assert not again["reference_from_cache"] and sum(n for n, probs in calls if not probs) == 6


# ---- detectors ----

def test_detector_errors_name_the_file_and_the_fix(tmp_path, inception_pt):
    with pytest.raises(EvaluationError, match=r"nope.pt: detector file not found; download inception-2015-12-05.pt "
                                              r"yourself .* this project never downloads it"):
        load_detector(f"inception:{tmp_path / 'nope.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model" * 100)
    with pytest.raises(EvaluationError, match="junk.pt: not a TorchScript file"):
        load_detector(f"inception:{junk}")
    pickled = tmp_path / "pickled.pt"
    torch.save(StandInInception().state_dict(), pickled)
    with pytest.raises(EvaluationError, match="pickled.pt: not a TorchScript file"):
        load_detector(f"inception:{pickled}")
    with pytest.raises(EvaluationError, match=r"forward takes \(x\), not the Inception detector's \(img, "
                                              r"return_features, use_fp16, no_output_bias\)"):
        load_detector(f"inception:{script(WrongSignature(), tmp_path / 'sig.pt')}")
    bad = load_detector(f"inception:{script(WrongOutput(), tmp_path / 'out.pt')}")
    with pytest.raises(EvaluationError, match=r"out.pt: the detector's features are torch.float32 \[4\] for a "
                                              r"batch of 4; expected floats \[4, dim\]"):
        bad(torch.zeros(4, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(EvaluationError, match="expected KIND:PATH with KIND one of inception, domain"):
        load_detector(inception_pt)


def test_inception_detector_outputs(inception_pt):
    det = load_detector(f"inception:{inception_pt}")
    batch = torch.from_numpy(images(5, 8)).permute(0, 3, 1, 2).contiguous()
    features, probs = det(batch)
    module = StandInInception()
    np.testing.assert_allclose(features, module(batch, return_features=True).detach(), rtol=1e-6)
    np.testing.assert_allclose(probs, module(batch, no_output_bias=True).detach(), rtol=1e-6)
    assert det.describe()["sha256"] == hashlib.sha256(open(inception_pt, "rb").read()).hexdigest()


# ---- reference cache ----

def counting(detector):
    calls = []
    real = detector._forward
    detector._forward = lambda batch, need_probs: (calls.append((batch.shape[0], need_probs)), real(batch, need_probs))[1]
    return calls


def test_reference_cache_is_reused_and_invalidated(tmp_path, inception_pt):
    ref, samples = tmp_path / "ref.npz", images(12, 10, high=200)
    np.savez(ref, arr_0=images(20, 9))
    det = load_detector(f"inception:{inception_pt}")
    calls = counting(det)
    first = evaluate_samples(samples, ref, det, batch_size=8, progress=False)
    assert sum(n for n, probs in calls if not probs) == 20 and not first["reference_from_cache"]
    cache = first["reference_cache"]
    assert cache == str(tmp_path / f"ref.npz.stats-{det.sha256[:16]}.npz")
    calls.clear()
    second = evaluate_samples(samples, ref, det, batch_size=8, progress=False)
    assert [probs for _, probs in calls] == [True, True]  # only the 12 samples went through the detector
    assert second["reference_from_cache"] and second["fid"] == first["fid"]
    assert (second["precision"], second["recall"]) == (first["precision"], first["recall"])
    np.savez(ref, arr_0=images(20, 11))  # the reference changed: the cache is stale
    calls.clear()
    third = evaluate_samples(samples, ref, det, batch_size=8, progress=False)
    assert sum(n for n, probs in calls if not probs) == 20 and not third["reference_from_cache"]
    assert third["fid"] != first["fid"]
    with open(cache, "wb") as f:  # a broken cache is recomputed, not trusted
        f.write(b"garbage")
    calls.clear()
    fourth = evaluate_samples(samples, ref, det, batch_size=8, progress=False)
    assert sum(n for n, probs in calls if not probs) == 20 and fourth["fid"] == third["fid"]


def test_precomputed_reference_mu_sigma_are_used(tmp_path, inception_pt):
    det = load_detector(f"inception:{inception_pt}")
    ref_images, other, samples = images(20, 12), images(30, 13), images(15, 14, high=180)
    mu_other, sigma_other = fid_statistics(extract_features(open_images(other), det, progress=False).features)
    np.savez(tmp_path / "plain.npz", arr_0=ref_images)
    np.savez(tmp_path / "adm.npz", arr_0=ref_images, mu=mu_other, sigma=sigma_other)
    plain = evaluate_samples(samples, tmp_path / "plain.npz", det, use_cache=False, progress=False)
    adm = evaluate_samples(samples, tmp_path / "adm.npz", det, use_cache=False, progress=False)
    sample_feats = extract_features(open_images(samples), det, progress=False).features
    assert adm["reference_statistics"] == "precomputed" and plain["reference_statistics"] == "features"
    assert adm["fid"] == pytest.approx(frechet_distance(*fid_statistics(sample_feats), mu_other, sigma_other),
                                       rel=1e-12)
    assert adm["fid"] != pytest.approx(plain["fid"], rel=1e-3)
    assert (adm["precision"], adm["recall"]) == (plain["precision"], plain["recall"])  # features of arr_0 for P/R
    # FID from precomputed mu / sigma equals FID from the features they came from
    np.savez(tmp_path / "adm_same.npz", arr_0=other, mu=mu_other, sigma=sigma_other)
    np.savez(tmp_path / "plain_same.npz", arr_0=other)
    from_stats = evaluate_samples(samples, tmp_path / "adm_same.npz", det, use_cache=False, progress=False)
    from_feats = evaluate_samples(samples, tmp_path / "plain_same.npz", det, use_cache=False, progress=False)
    assert from_stats["fid"] == pytest.approx(from_feats["fid"], rel=1e-12)
    np.savez(tmp_path / "other_detector.npz", arr_0=other, mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(EvaluationError, match="reference statistics are 5-d but .* gives 8-d features"):
        evaluate_samples(samples, tmp_path / "other_detector.npz", det, use_cache=False, progress=False)


# ---- tools/evaluate.py ----

def load_tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_inception_end_to_end(tmp_path, inception_pt):
    sample_images, ref_images = images(24, 15, high=220), images(30, 16)
    labels = np.arange(24) % 3
    np.savez(tmp_path / "samples.npz", arr_0=sample_images, labels=labels)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "tools/evaluate.py", "--reference", str(tmp_path / "ref.npz"), "--samples",
                           str(tmp_path / "samples.npz"), "--inception", inception_pt, "--json", str(out),
                           "--batch-size", "7", "--split-size", "10", "--device", "cpu", "--no-progress"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    module = StandInInception()  # the same weights as the scripted file, run here without the tool
    with torch.no_grad():
        s = torch.from_numpy(sample_images).permute(0, 3, 1, 2)
        s_feats, s_probs = module(s, return_features=True).numpy(), module(s, no_output_bias=True).numpy()
        r_feats = module(torch.from_numpy(ref_images).permute(0, 3, 1, 2), return_features=True).numpy()
    assert result["fid"] == pytest.approx(fid_reference(s_feats, r_feats), rel=1e-5)  # batches of 7 vs one batch
    assert result["inception_score"] == pytest.approx(is_reference(s_probs, 10), rel=1e-5)
    assert result["inception_score_splits"] == 3  # 10, 10, 4 in file order
    assert (result["precision"], result["recall"]) == precision_recall(r_feats, s_feats)
    assert (result["num_samples"], result["num_reference"]) == (24, 30)
    assert result["detector"]["kind"] == "inception" and result["detector"]["path"] == inception_pt
    assert result["detector"]["sha256"] == hashlib.sha256(open(inception_pt, "rb").read()).hexdigest()
    assert "class_accuracy" not in result and "fid_domain" not in result
    assert done.stdout.startswith("FID ") and "Inception Score" in done.stdout


def test_cli_domain_features_and_class_accuracy(tmp_path, capsys):
    domain = script(StandInDomain(), tmp_path / "domain.pt")
    sample_images = images(20, 17)
    with torch.no_grad():
        logits = StandInDomain()(torch.from_numpy(sample_images).permute(0, 3, 1, 2))[1].numpy()
    labels = logits.argmax(1)
    labels[:5] = (labels[:5] + 1) % 4  # 5 of 20 wrong on purpose
    np.savez(tmp_path / "samples.npz", arr_0=sample_images, labels=labels)
    np.savez(tmp_path / "ref.npz", arr_0=images(25, 18))
    tool = load_tool()
    out = tmp_path / "out.json"
    assert tool.main(["--reference", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "samples.npz"),
                      "--features", f"domain:{domain}", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["class_accuracy"] == 0.75
    assert "fid" not in result and "inception_score" not in result and result["fid_domain"] > 0
    assert result["detector"]["kind"] == "domain"
    table = capsys.readouterr().out
    assert table.startswith("FID-domain ") and "Class accuracy" in table


def test_cli_bad_input_exits_2_without_traceback(tmp_path, inception_pt, capsys):
    tool = load_tool()
    np.savez(tmp_path / "samples.npz", arr_0=images(4, 19))
    np.savez(tmp_path / "ref.npz", images=images(4, 20))
    cases = [
        (["--reference", str(tmp_path / "ref.npz"), "--inception", inception_pt], "ref.npz: no arr_0 in this npz"),
        (["--reference", str(tmp_path / "none"), "--inception", inception_pt], "none: no such file or folder"),
        (["--reference", str(tmp_path / "samples.npz"), "--inception", str(tmp_path / "x.pt")],
         "x.pt: detector file not found"),
    ]
    for argv, message in cases:
        assert tool.main(["--samples", str(tmp_path / "samples.npz"), "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path}") and message in err and "Traceback" not in err


# ---- distributed ----

def test_two_ranks_equal_one_rank(tmp_path, inception_pt):
    sample_images, ref_images = images(30, 21, high=210), images(26, 22)
    np.savez(tmp_path / "samples.npz", arr_0=sample_images)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    out = tmp_path / "two.json"
    done = torchrun(2, ["tools/evaluate.py", "--reference", str(tmp_path / "ref.npz"), "--samples",
                        str(tmp_path / "samples.npz"), "--inception", inception_pt, "--json", str(out),
                        "--batch-size", "7", "--split-size", "8", "--device", "cpu", "--no-cache", "--no-progress"],
                    timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(out.read_text())
    one = evaluate_samples(tmp_path / "samples.npz", tmp_path / "ref.npz", f"inception:{inception_pt}", batch_size=7,
                           device="cpu", use_cache=False, split_size=8, progress=False)
    assert (two["world_size"], one["world_size"]) == (2, 1)
    for key in ("fid", "inception_score", "inception_score_std", "precision", "recall", "num_samples",
                "num_reference"):
        assert two[key] == one[key], key  # batches [7k, 7k + 7) on 1 or 2 ranks (3 + 2 of them) -> same floats


def test_cli_without_samples_caches_the_reference_for_later_evaluations(tmp_path, inception_pt):
    """tools/evaluate.py with no --samples extracts and caches the reference statistics (the demo does it once before
    its two runs evaluate side by side); a later evaluation reads them and gets what extracting them would give."""
    for i in range(6):
        (tmp_path / "ref" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images(1, 50 + i, size=24)[0]).save(tmp_path / "ref" / f"c{i % 2}" / f"{i}.png")
    cmd = [sys.executable, "tools/evaluate.py", "--reference", str(tmp_path / "ref"), "--inception", inception_pt,
           "--device", "cpu", "--no-progress"]
    missing = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "give --image-size" in missing.stderr  # an ImageFolder needs the samples' size
    done = subprocess.run([*cmd, "--image-size", "16"], cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    det = load_detector(f"inception:{inception_pt}")
    cache = tmp_path / f"ref.stats-{det.sha256[:16]}-16px.npz"
    assert f"(6 images): cached at {cache}" in done.stdout
    calls = counting(det)
    cached = evaluate_samples(images(8, 36), tmp_path / "ref", det, batch_size=4, progress=False)
    assert cached["reference_from_cache"] and sum(n for n, probs in calls if not probs) == 0
    fresh = evaluate_samples(images(8, 36), tmp_path / "ref", det, batch_size=4, progress=False, use_cache=False)
    assert not fresh["reference_from_cache"]
    assert (cached["fid"], cached["precision"], cached["recall"]) == (fresh["fid"], fresh["precision"],
                                                                     fresh["recall"])
