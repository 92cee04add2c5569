"""The embedded evaluator: fitting (class + attribute heads), its file (weights_only, meta), predictions, class
accuracy of samples through evaluate_samples / tools/evaluate.py, tools/fit_evaluator.py and its refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sampling_fixtures import load_tool

from dpar_scale.evaluation import evaluate_samples
from dpar_scale.evaluation.detectors import load_detector
from dpar_scale.evaluation.domain_classifier import (DomainClassifier, head_accuracy, load_domain_classifier,
                                                     predict, save_domain_classifier)
from dpar_scale.evaluation.domain_fit import fit_domain_classifier, load_labelled_images
from dpar_scale.evaluation.sources import EvaluationError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHAPES = ("disc", "square")


def _picture(shape: str, colour: str, rng, size: int = 16) -> np.ndarray:
    img = np.full((size, size, 3), rng.integers(90, 130), dtype=np.uint8)  # grey background
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cy, cx = size / 2 + rng.uniform(-2, 2, 2)
    r = rng.uniform(4, 6)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if shape == "disc" else \
        (np.abs(yy - cy) <= r * 0.8) & (np.abs(xx - cx) <= r * 0.8)
    img[mask] = COLOURS[colour]
    return img


@pytest.fixture(scope="module")
def easy_folder(tmp_path_factory):
    """An easy ImageFolder of 16-px pictures, 3 classes (red disc, green square, blue disc), 12 each, with
    attributes.jsonl naming shape and colour (so the attribute heads are not just the class renamed)."""
    root = tmp_path_factory.mktemp("easy") / "images"
    rng = np.random.default_rng(0)
    classes = [("disc", "red"), ("square", "green"), ("disc", "blue")]
    lines = []
    for c, (shape, colour) in enumerate(classes):
        folder = root / f"{c:02d}_{colour}_{shape}"
        folder.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(_picture(shape, colour, rng)).save(folder / f"{i:05d}.png")
            lines.append(json.dumps({"path": f"{folder.name}/{i:05d}.png", "shape": shape, "colour": colour}))
    (root / "attributes.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def fitted(easy_folder):
    torch.manual_seed(0)
    model, meta = fit_domain_classifier(str(easy_folder), epochs=6, batch_size=12, width=8, lr=1e-2,
                                        held_out=0.25, progress=False)
    return model, meta


def test_fitted_model_recognises_each_class_and_attribute(easy_folder, fitted):
    model, meta = fitted
    images, labels, names, _ = load_labelled_images(str(easy_folder), heads=("shape", "colour"))
    assert names["shape"] == ["disc", "square"] and names["colour"] == ["blue", "green", "red"]
    pred = predict(model, images)
    assert set(pred) == {"class", "shape", "colour"}
    for c in range(3):  # real images of class c are predicted as c
        assert (pred["class"][labels["class"] == c] == c).mean() >= 0.9
    acc = head_accuracy(pred, labels)
    assert acc["shape"] >= 0.9 and acc["colour"] >= 0.9
    assert meta["held_out_accuracy"]["class"] >= 0.9 and meta["num_held_out"] == 9


def test_file_round_trip_with_weights_only(tmp_path, easy_folder, fitted):
    model, meta = fitted
    path = tmp_path / "ev.pt"
    save_domain_classifier(path, model, meta)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "dpar-domain-classifier" and payload["meta"]["heads"]["class"][0] == "00_red_disc"
    loaded = load_domain_classifier(path)
    images, _, _, _ = load_labelled_images(str(easy_folder))
    x = torch.from_numpy(images[:5]).permute(0, 3, 1, 2)
    for a, b in zip(model(x), loaded(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # another input size is resized to the model's own
    big = torch.nn.functional.interpolate(x.float(), scale_factor=2).round().to(torch.uint8)
    assert loaded(big)[1].shape == (5, 3)


def test_single_class_samples_give_the_fraction_predicted_as_that_class(tmp_path, easy_folder, fitted):
    model, meta = fitted
    path = tmp_path / "ev.pt"
    save_domain_classifier(path, model, meta)
    images, labels, _, _ = load_labelled_images(str(easy_folder))
    rng = np.random.default_rng(1)
    # samples all labelled class 0: real class-0 pictures and (wrongly labelled) pictures of class 1
    samples = np.concatenate([images[labels["class"] == 0][:6], images[labels["class"] == 1][:4]])
    samples = samples[rng.permutation(len(samples))]
    np.savez(tmp_path / "samples.npz", arr_0=samples, labels=np.zeros(len(samples), dtype=np.int64))
    result = evaluate_samples(str(tmp_path / "samples.npz"), str(easy_folder), f"domain:{path}", batch_size=4,
                              use_cache=False, progress=False)
    want = float((predict(model, samples)["class"] == 0).mean())
    assert result["class_accuracy"] == pytest.approx(want) and 0.5 <= want <= 0.7
    assert "fid" not in result and result["fid_domain"] > 0 and result["detector"]["feature_dim"] == 32


def test_evaluate_cli_with_a_fitted_evaluator(tmp_path, easy_folder, fitted, capsys):
    model, meta = fitted
    save_domain_classifier(tmp_path / "ev.pt", model, meta)
    images, labels, _, _ = load_labelled_images(str(easy_folder))
    np.savez(tmp_path / "s.npz", arr_0=images[:12], labels=labels["class"][:12])
    out = tmp_path / "m.json"
    assert load_tool("evaluate").main(["--samples", str(tmp_path / "s.npz"), "--reference", str(easy_folder),
                                       "--features", f"domain:{tmp_path / 'ev.pt'}", "--json", str(out),
                                       "--no-progress", "--no-cache"]) == 0
    result = json.loads(out.read_text())
    assert result["class_accuracy"] >= 0.9 and "fid_domain" in result and "FID-domain" in capsys.readouterr().out


def test_missing_or_damaged_evaluator_names_the_fix(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model at all")
    for path in (tmp_path / "missing.pt", bad):
        with pytest.raises(EvaluationError, match="tools/fit_evaluator.py"):
            load_detector(f"domain:{path}")
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(EvaluationError, match="not a domain-classifier file.*fit_evaluator"):
        load_domain_classifier(tmp_path / "other.pt")
    torch.save({"format": "dpar-domain-classifier", "version": 1, "state_dict": {"x": torch.zeros(1)},
                "meta": {"head_sizes": {"class": 3}, "image_size": 8, "width": 8}}, tmp_path / "wrong.pt")
    with pytest.raises(EvaluationError, match="do not match"):
        load_domain_classifier(tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="class"):
        DomainClassifier({"shape": 2}, 8)


def test_fit_evaluator_tool_writes_or_refuses(tmp_path, easy_folder, capsys):
    tool = load_tool("fit_evaluator")
    out = tmp_path / "ev.pt"
    assert tool.main(["--images", str(easy_folder), "--out", str(out), "--epochs", "6", "--batch-size", "12",
                      "--width", "8", "--lr", "1e-2", "--held-out", "0.25", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy on 9 real images" in printed and "shape" in printed and "colour" in printed
    assert load_domain_classifier(out).meta["held_out_accuracy"]["class"] >= 0.95
    # one step cannot fit it: below --min-accuracy the file is not written (status 2), unless allowed
    low = tmp_path / "low.pt"
    args = ["--images", str(easy_folder), "--out", str(low), "--max-steps", "1", "--width", "8", "--lr", "1e-5",
            "--held-out", "0.25", "--no-progress"]
    assert tool.main(args) == 2 and not low.exists()
    assert "below 95%" in capsys.readouterr().err
    assert tool.main(args + ["--allow-low-accuracy"]) == 0 and low.exists()
    assert "WARNING" in capsys.readouterr().err


def test_fit_tokenizer_reports_the_ceiling_its_reconstructions_set(tmp_path, easy_folder, fitted, capsys):
    """fit_tokenizer --evaluator: the evaluator's class accuracy on held-out reconstructions beside the originals'.
    A per-pixel codebook reconstructs the shapes exactly (only grey levels of the background the fit never saw are
    a few levels off, > 30 dB): the same accuracy; one code for the whole
    picture makes every reconstruction the same image: at most one class recognised."""
    from dpar_scale.evaluation.domain_classifier import save_domain_classifier

    model, meta = fitted
    evaluator = tmp_path / "evaluator.pt"
    save_domain_classifier(evaluator, model, meta)
    fit_tokenizer = load_tool("fit_tokenizer")
    reports = {}
    for name, block, codes in (("exact", 1, 64), ("one_code", 16, 1)):
        out = tmp_path / f"{name}.json"
        assert fit_tokenizer.main(["--images", str(easy_folder), "--out", str(tmp_path / f"{name}.safetensors"),
                                   "--image-size", "16", "--block-size", str(block), "--codebook-size", str(codes),
                                   "--holdout", "0.5", "--evaluator", str(evaluator), "--json", str(out),
                                   "--quiet"]) == 0
        reports[name] = json.loads(out.read_text())
    assert "recognises" in capsys.readouterr().out
    exact, one = reports["exact"], reports["one_code"]
    assert exact["held_out_images"] == one["held_out_images"] == 18
    assert exact["original_class_accuracy"] == one["original_class_accuracy"] >= 0.9
    assert exact["psnr_held_out_db"] > 30 and exact["reconstruction_class_accuracy"] == exact["original_class_accuracy"]
    assert one["reconstruction_class_accuracy"] <= 0.5  # 3 classes of ~6 held-out pictures, one class predicted
