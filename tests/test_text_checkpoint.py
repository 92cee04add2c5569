"""A text model's checkpoint and export carry its text tokenizer, so sampling needs nothing else; another text
model is a clear error (at sampling and on resume); tools/sample.py samples prompts (--prompts, --prompts-file)
into a prompt-labelled grid."""
import json

import numpy as np
import pytest
import torch

from dpar_scale.checkpoint.export import export_checkpoint
from dpar_scale.checkpoint.text_model import TEXT_IDENTITY_FILE, TEXT_MODEL_FILE
from dpar_scale.config import load_config
from dpar_scale.text import TextTokenizer, TextTokenizerError, train_text_tokenizer
from dpar_scale.train.trainer import Trainer

from conftest import add_text_captions, write_code_dataset
from parallel_helpers import overrides
from sampling_fixtures import load_tool

sample = load_tool("sample")


def text_run(root, codes, model_path, kind, *extra):
    more = ["model.patch.mode=static"] if kind == "dpar" else []  # no entropy model needed to sample it
    return overrides(root / kind, codes, kind, "model.conditioning=text", f"model.text.tokenizer={model_path}",
                     "model.text.vocab_size=36", "model.text.max_length=12", *more, *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dpar_scale.tokenizer.kmeans import KMeansTokenizer

    root = tmp_path_factory.mktemp("text_ckpt")
    codes = write_code_dataset(root / "codes", entropy=False)
    model_path = add_text_captions(codes)
    KMeansTokenizer(torch.rand(32, 3 * 2 * 2, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                    block_size=2).save(str(root / "km.safetensors"))
    for kind in ("dpar", "gpt"):
        Trainer(load_config(None, text_run(root, codes, model_path, kind))).fit()
    return root, codes, model_path


def ckpt(root, kind):
    return root / kind / "checkpoints" / "step-000004"


def sample_args(root, checkpoint, out, *extra):
    return ["--checkpoint", str(checkpoint), "--out", str(out), "--tokenizer", "kmeans", "--tokenizer-path",
            str(root / "km.safetensors"), "--cfg-scale", "2.0", *extra]


def test_checkpoint_and_export_carry_the_text_model(trained, tmp_path):
    root, _, model_path = trained
    original = open(model_path, "rb").read()
    for kind in ("dpar", "gpt"):
        folder = ckpt(root, kind)
        assert (folder / TEXT_MODEL_FILE).read_bytes() == original
        assert json.loads((folder / TEXT_IDENTITY_FILE).read_text()) == TextTokenizer(original).identity()
        assert TEXT_MODEL_FILE in json.loads((folder / "complete.json").read_text())["files"]
        export_checkpoint(folder, tmp_path / kind)
        assert (tmp_path / kind / TEXT_MODEL_FILE).read_bytes() == original


@pytest.mark.parametrize("kind", ["dpar", "gpt"])
def test_sample_prompts_from_an_export_alone(trained, tmp_path, kind, capsys):
    root, _, model_path = trained
    export_checkpoint(ckpt(root, kind), tmp_path / "export")
    (root / "moved.model").write_bytes(open(model_path, "rb").read())  # the training path is not needed
    # the last is truncated, as in training; the second holds a character the text model cannot spell
    prompts = ["a red thing of class 1", "class 2 in blue ✓", "a " * 200]
    out = tmp_path / "samples"
    assert sample.main(sample_args(root, tmp_path / "export", out, "--prompts", *prompts,
                                   "--num-per-prompt", "2", "--batch-size", "4")) == 0
    meta = json.loads((out / "prompts.json").read_text())
    longer = sum(len(TextTokenizer.load(model_path).encode(p)) > 12 for p in prompts)
    assert meta["prompts"] == prompts and meta["truncated_prompts"] == longer >= 1 and meta["num_per_prompt"] == 2
    assert meta["unspellable_characters"] == {"1": ["✓"]}
    assert "1 prompt(s) hold characters the text tokenizer cannot spell" in capsys.readouterr().out
    assert np.load(out / "labels.npy").tolist() == [0, 0, 1, 1, 2, 2]
    assert np.load(out / "codes.npy").shape == (6, 4, 4)
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.size[1] == 3 * (8 + 2) + 2  # one row per prompt (8 px images)
    # the same prompts from a file (plain lines and JSON Lines) give the same images
    listing = tmp_path / "prompts.jsonl"
    listing.write_text(json.dumps({"caption": prompts[0]}) + "\n\n" + prompts[1] + "\n" + prompts[2] + "\n")
    assert sample.main(sample_args(root, tmp_path / "export", tmp_path / "again", "--prompts-file", str(listing),
                                   "--num-per-prompt", "2")) == 0
    assert np.array_equal(np.load(tmp_path / "again" / "codes.npy"), np.load(out / "codes.npy"))


def test_another_text_model_is_refused(trained, tmp_path, capsys):
    root, codes, model_path = trained
    other = tmp_path / "other.model"
    train_text_tokenizer(["some other words entirely", "and a different vocabulary here"] * 5, 24).save(str(other))
    base = sample_args(root, ckpt(root, "gpt"), tmp_path / "s", "--prompts", "a red thing")
    assert sample.main(base + ["--text-tokenizer", str(other)]) == 2
    assert "is not the one the checkpoint" in capsys.readouterr().err
    assert sample.main(sample_args(root, ckpt(root, "gpt"), tmp_path / "s", "--classes", "0")) == 2
    assert "is a text model: give --prompts" in capsys.readouterr().err
    # a damaged copy inside the checkpoint is found by its recorded sha256
    damaged = tmp_path / "damaged"
    export_checkpoint(ckpt(root, "gpt"), damaged)
    data = bytearray((damaged / TEXT_MODEL_FILE).read_bytes())
    data[-5] ^= 1
    (damaged / TEXT_MODEL_FILE).write_bytes(bytes(data))
    assert sample.main(sample_args(root, damaged, tmp_path / "s", "--prompts", "a")) == 2
    err = capsys.readouterr().err
    assert "does not match its recorded sha256" in err or "not a sentencepiece model" in err
    (damaged / TEXT_MODEL_FILE).unlink()
    assert sample.main(sample_args(root, damaged, tmp_path / "s", "--prompts", "a")) == 2
    assert "carries no text_tokenizer.model" in capsys.readouterr().err
    # resuming with another text model is refused before anything trains
    resumed = text_run(root, codes, str(other), "gpt", "checkpoint.resume=auto", "train.steps=6",
                       "model.text.vocab_size=36")
    with pytest.raises(TextTokenizerError, match="is not the one the checkpoint"):
        Trainer(load_config(None, resumed))


def test_resume_into_another_text_shape_is_refused(trained, tmp_path):
    """A text checkpoint resumed with another text embedding size, or as a class model, is refused before any
    weight loads, naming the key, both values and the override that resumes it (the load itself only gave
    torch's size-mismatch traceback)."""
    import shutil

    from dpar_scale.config import ConfigError

    root, codes, model_path = trained
    shutil.copytree(root / "gpt", tmp_path / "gpt")  # resumed here, the module's run stays as it is
    resume = ["checkpoint.resume=auto", "train.steps=6"]
    with pytest.raises(ConfigError, match=r"model\.text\.vocab_size: checkpoint 36, config 40 .*"
                                          r"model\.text\.vocab_size=36"):
        Trainer(load_config(None, text_run(tmp_path, codes, model_path, "gpt", *resume, "model.text.vocab_size=40")))
    with pytest.raises(ConfigError, match=r"model\.conditioning: checkpoint text, config class .*"
                                          r"model\.conditioning=text\)"):
        Trainer(load_config(None, text_run(tmp_path, codes, model_path, "gpt", *resume, "model.conditioning=class")))
    assert sorted(p.name for p in (tmp_path / "gpt" / "checkpoints").iterdir()) == ["step-000004"]


@pytest.mark.parametrize("kind", ["dpar", "gpt"])
def test_caption_dropout_in_training_steps_only(trained, tmp_path, kind):
    """Through the trainer: the held-out loss of the same weights (the module's trained run, resumed) is the same
    with caption dropout 0 and 0.9 (validation reads every caption), while a training forward of the same batch is
    not (it drops them)."""
    import shutil

    from dpar_scale.train.loss import code_loss_per_image

    root, codes, model_path = trained
    trainers = {}
    for p in (0.0, 0.9):
        shutil.copytree(root / kind, tmp_path / str(p) / kind)
        trainers[p] = Trainer(load_config(None, text_run(tmp_path / str(p), codes, model_path, kind,
                                                         f"model.text.dropout={p}", "checkpoint.resume=auto",
                                                         "train.steps=6")))
    val = {p: t.validate()["val_loss"] for p, t in trainers.items()}
    assert val[0.0] == val[0.9]
    train = {}
    for p, t in trainers.items():
        batch = t.step_batches()[0][0]
        t.model.train()
        with torch.no_grad():
            train[p] = code_loss_per_image(t.model(**t.model_inputs(batch)), batch.codes).mean().item()
    assert abs(train[0.0] - train[0.9]) > 1e-4 * abs(train[0.0])


def test_training_counts_caption_characters_the_text_model_cannot_spell(trained, tmp_path):
    """A text tokenizer that cannot spell some characters of the captions (here: one fitted without the digits,
    as an outside model may be): every step logs how many unk pieces its captions became; none with the own."""
    from conftest import text_caption
    from dpar_scale.train.metrics_log import read_metrics

    root, codes, model_path = trained
    digitless = [text_caption(label, i, k).translate(str.maketrans("", "", "0123456789"))
                 for label in range(3) for i in range(8) for k in range(2)]
    train_text_tokenizer(digitless, 30).save(str(tmp_path / "digitless.model"))
    for name, model in (("own", model_path), ("digitless", tmp_path / "digitless.model")):
        Trainer(load_config(None, text_run(tmp_path / name, codes, str(model), "gpt", "train.steps=2"))).fit()
    counts = {name: [r["text_unknown"] for r in read_metrics(tmp_path / name / "gpt" / "metrics.jsonl") if "loss" in r]
              for name in ("own", "digitless")}
    assert counts["own"] == [0, 0] and min(counts["digitless"]) > 0  # the class digits of the step's captions


def test_sample_ddp_samples_a_caption_set(trained, tmp_path, capsys):
    root, _, _ = trained
    sample_ddp = load_tool("sample_ddp")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"path": f"{i}.png", "caption": c}) + "\n"
                                for i, c in enumerate(["a red thing of class 0", "class 1 in blue", "green 2 ✓"])))
    args = ["--checkpoint", str(ckpt(root, "dpar")), "--num-samples", "6", "--batch-size", "4", "--no-progress",
            "--tokenizer", "kmeans", "--tokenizer-path", str(root / "km.safetensors"), "--cfg-scale", "2.0"]
    out = tmp_path / "eval"
    assert sample_ddp.main(args + ["--out", str(out), "--captions", str(captions)]) == 0
    assert "1 prompt(s) hold characters the text tokenizer cannot spell (the model reads them as its unk piece): " \
           "'green 2 ✓': '✓'" in capsys.readouterr().out
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (6, 8, 8, 3)
        assert sorted(f["labels"].tolist()) == [0, 0, 1, 1, 2, 2]  # balanced over the captions
    assert json.loads((out / "captions.json").read_text())[1] == "class 1 in blue"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["captions"]["count"] == 3
    # the same folder with other captions is refused (the record names the caption set)
    captions.write_text("one\ntwo\nthree\n")
    assert sample_ddp.main(args + ["--out", str(out), "--captions", str(captions)]) == 2
    assert "other settings" in capsys.readouterr().err
    assert sample_ddp.main(args + ["--out", str(tmp_path / "none")]) == 2
    assert "give --captions FILE" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_sample_ddp_evaluates_a_caption_set_without_class_accuracy(trained, tmp_path):
    """--evaluate on a text model's caption set: FID-domain, precision and recall as the library computes them for
    the same files, and no class_accuracy (the labels are caption indices, not classes)."""
    from dpar_scale.evaluation import evaluate_samples
    from test_evaluation import StandInDomain, images, script

    root, _, _ = trained
    detector = script(StandInDomain(classes=3), tmp_path / "domain.pt")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=images(12, seed=5, size=8))
    (tmp_path / "captions.txt").write_text("class 0 in red\nclass 1 in blue\nclass 2 in green\n")
    out = tmp_path / "eval"
    args = ["--checkpoint", str(ckpt(root, "gpt")), "--num-samples", "6", "--batch-size", "6", "--no-progress",
            "--tokenizer", "kmeans", "--tokenizer-path", str(root / "km.safetensors"), "--cfg-scale", "2.0",
            "--out", str(out), "--captions", str(tmp_path / "captions.txt"), "--evaluate", "--reference", str(ref),
            "--features", f"domain:{detector}", "--no-cache"]
    assert load_tool("sample_ddp").main(args) == 0
    got = json.loads((out / "metrics.json").read_text())
    want = evaluate_samples(str(out / "samples.npz"), str(ref), f"domain:{detector}", use_cache=False,
                            progress=False)
    assert "class_accuracy" in want and "class_accuracy" not in got  # the file's labels are caption indices
    assert got["num_samples"] == 6 and got["num_reference"] == 12
    for key in ("fid_domain", "precision", "recall"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_position_budget_counts_the_captions(trained, tmp_path):
    """data.global_tokens_per_microbatch packs Σ (M_i + L_i) for a text DPAR: every micro-batch's packed global
    sequence fits the budget, although counting one class position per image would have packed more images."""
    from dpar_scale.data.packing import pack_microbatches

    root, codes, model_path = trained
    cfg = load_config(None, text_run(tmp_path, codes, model_path, "dpar", "data.global_tokens_per_microbatch=40",
                                     "train.grad_accum=2"))
    trainer = Trainer(cfg)
    batches, step_ids = trainer.batches.for_step(0)
    assert len(batches) == 2
    for b in batches:
        layout = trainer.model_inputs(b)["layout"]
        assert layout.num_global_positions == b.num_patches + int(b.text_lengths.sum()) <= 40
    as_class = next(pack_microbatches(zip(step_ids.tolist(), trainer.source.patch_lengths(step_ids)), 40))
    assert len(as_class) > len(batches[0].codes)


def test_demo_evaluation_prompts_name_their_shape_and_colour(tmp_path):
    """The text demo's evaluation prompts are worded by the dataset's templates from a picture's attributes with a
    drawn colour: each names its colour word, the classes come in turn, and they are seeded."""
    from dpar_scale.data.synthetic import generate_dataset

    demo_text = load_tool("demo_text")
    generate_dataset(str(tmp_path / "images"), 3, 10, 32, seed=0, progress=False)
    prompts = demo_text.evaluation_prompts(tmp_path / "images", 20, seed=1)
    assert [p["shape"] for p in prompts[:10]] == sorted({p["shape"] for p in prompts}, key=[
        p["shape"] for p in prompts].index)
    for p in prompts:
        if p["shape"] != "sky_sun":
            assert p["colour"] in p["prompt"].lower(), p
    assert prompts == demo_text.evaluation_prompts(tmp_path / "images", 20, seed=1)
    assert len({p["colour"] for p in prompts}) > 3


def test_demo_table_shows_fid_domain_and_chance_levels(capsys):
    """The text demo's table: FID-domain, precision, recall against the real images beside prompt following, each
    accuracy followed by its chance level; a metric the run could not give (precision of <= 3 samples) is n/a."""
    demo_text = load_tool("demo_text")
    row = {"fid_domain": 212.345, "precision": 0.25, "recall": 0.125, "val_loss": 1.5, "num_reference": 3000,
           "shape_accuracy": 0.4, "shape_chance": 0.1, "color_accuracy": 0.35, "color_chance": 0.18, "grid": "g.png"}
    summary = {"models": {"gpt-text": row, "dpar-text": {**row, "fid_domain": 1.23e-3, "precision": None}},
               "prompts": 50, "samples_per_prompt": 4, "train_steps": 300}
    demo_text.print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert header.split() == ["model", "FID-domain", "precision", "recall", "val", "loss", "shape", "acc", "(chance)",
                              "color", "acc", "(chance)"]
    assert any("50 held-out prompts x 4 samples, 300 training steps; FID-domain against 3000 real images" in line
               for line in lines)
    gpt, dpar = (next(line.split() for line in lines if line.startswith(name)) for name in ("gpt-text", "dpar-text"))
    assert gpt == ["gpt-text", "212.3", "0.250", "0.125", "1.500", "0.400", "0.100", "0.350", "0.180"]
    assert dpar[1:3] == ["0.00123", "n/a"]


def test_text_run_resumed_equals_the_straight_run(trained, tmp_path):
    """Captions and caption dropout are functions of the cursor and step: 2 steps + resume to 4 trains exactly
    the straight 4-step run (same losses, same truncated-caption counts)."""
    from dpar_scale.train.metrics_log import read_metrics

    root, codes, model_path = trained
    common = ["model.text.dropout=0.3", "checkpoint.resume=auto"]
    Trainer(load_config(None, text_run(tmp_path / "straight", codes, model_path, "dpar", *common))).fit()
    resumed = tmp_path / "resumed"
    Trainer(load_config(None, text_run(resumed, codes, model_path, "dpar", *common, "train.steps=2"))).fit()
    Trainer(load_config(None, text_run(resumed, codes, model_path, "dpar", *common))).fit()
    rows = {name: [(r["loss"], r["text_truncated"]) for r in read_metrics(tmp_path / name / "dpar" / "metrics.jsonl")
                   if "loss" in r] for name in ("straight", "resumed")}
    assert rows["resumed"] == rows["straight"] and len(rows["straight"]) == 4
