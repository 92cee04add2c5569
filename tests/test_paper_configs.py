"""The paper's runs (configs/paper/): every config loads, fits the data it names, builds the model the paper
reports, resolves its epochs to steps, renders its Slurm job for 16 x 8 GPUs and costs what the paper's saving
says; plus the pieces these rest on (epochs -> steps in a real run, the loader honouring the ablation rules).

New files under configs/paper/ are picked up by enumerating the folder. A file without model.preset is a fragment
(recipe, per-resolution base) and must be included by some run config.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dpar_scale.config import PatchConfig, load_config, read_config_file
from dpar_scale.data import shards as S
from dpar_scale.data.loader import BatchSource, CodeData
from dpar_scale.launch import check_data_at_launch
from dpar_scale.models import build_model, count_params, resolve_model_config
from dpar_scale.models.presets import REPORTED_M
from dpar_scale.patching.rule import patch_lengths
from dpar_scale.train.trainer import Trainer

from conftest import write_code_dataset
from sampling_fixtures import load_tool

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
FILES = sorted(PAPER.rglob("*.yaml"))
RUNS = [p for p in FILES if read_config_file(p).get("model", {}).get("preset")]
IMAGENET_IMAGES, VIEWS = 1_281_167, 10  # ImageNet-1k train; LlamaGen's ten-crop (5 crops + their mirrors)
# The data sets the configs may name, as the runbook's extract_codes commands write them: (grid side, pixels)
DATASETS = {"data/imagenet/codes-256": (16, 256), "data/imagenet/codes-384": (24, 384)}


def rel(path: Path) -> str:
    return str(path.relative_to(PAPER))


def stand_in_manifest(folder: Path, side: int, pixels: int) -> Path:
    """An ImageNet-sized code manifest (no shards): what tools/extract_codes.py --ten-crop writes for ImageNet."""
    folder.mkdir(parents=True, exist_ok=True)
    S.write_manifest(str(folder), {
        "format": S.FORMAT, "format_version": S.FORMAT_VERSION, "num_images": IMAGENET_IMAGES * VIEWS,
        "num_source_images": IMAGENET_IMAGES, "grid": [side, side], "vocab_size": 16384,
        "tokenizer": {"name": "llamagen-vq16", "path": "", "sha256": ""}, "image_size": pixels,
        "augmentation": {"ten_crop": True, "flip": True, "copies_per_image": VIEWS}, "num_classes": 1000,
        "classes": [f"n{i:08d}" for i in range(1000)], "shards": [], "skipped": []})
    return folder


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return {name: stand_in_manifest(root / Path(name).name, side, px) for name, (side, px) in DATASETS.items()}


@pytest.fixture(scope="module")
def slurm_cli():
    spec = importlib.util.spec_from_file_location("launcher_slurm", REPO / "launchers" / "slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reported_tolerance(value: float) -> float:
    """Half a unit of the last significant digit the paper printed: 111 -> 0.5, 120 -> 5, 1400 (1.4B) -> 50,
    115.0 -> 0.05 (the authors' code counts are given to one decimal)."""
    if not float(value).is_integer():
        return 0.05
    unit = 1
    while value % (unit * 10) == 0:
        unit *= 10
    return unit / 2


def expected_facts(path: Path) -> dict:
    """What the paper (and LlamaGen's recipe) says this run is, written out from its file name."""
    name = path.stem
    ablation = path.parent.name == "ablations"
    kind, size, px = ("dpar", "l", 256) if ablation else (name.split("-")[0], name.split("-")[1], int(name[-3:]))
    if kind == "entropy":
        size = "b"
    return {"kind": kind, "preset": f"{kind}-{size}", "px": px, "epochs": 50 if ablation else 300,
            "cfg_scale": 2.0 if size in ("b", "l") else 1.75, "threshold": {256: 7.8, 384: 7.9}[px],
            "resize": 256 if px == 384 else 0}


def test_every_fragment_is_included_by_a_run():
    included, todo = set(), list(RUNS)
    while todo:  # include names are relative to the file that names them
        path = todo.pop()
        names = (yaml.safe_load(path.read_text()) or {}).get("include", [])
        for name in [names] if isinstance(names, str) else names:
            target = (path.parent / name).resolve()
            if target not in included:
                included.add(target)
                todo.append(target)
    fragments = [p for p in FILES if p not in RUNS]
    assert len(RUNS) >= 22 and fragments, "configs/paper/ lost its runs or its shared recipe"
    orphans = [rel(p) for p in fragments if p.resolve() not in included]
    assert not orphans, f"fragments no run includes: {orphans}"


@pytest.mark.parametrize("path", RUNS, ids=rel)
def test_config_fits_its_data_and_the_paper(path, stand_ins, slurm_cli, capsys):
    cfg = load_config(path)
    facts = expected_facts(path)
    # the recipe (LlamaGen's, which the DPAR paper trains with)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-4, (0.9, 0.95), 0.05,
                                                                                           1.0)
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.data.batch_size, cfg.train.precision) == \
        ("constant", 0, 256, "bf16")
    assert (cfg.model.dropout, cfg.model.class_dropout, cfg.train.epochs) == (0.1, 0.1, facts["epochs"])
    assert (cfg.sample.cfg_scale, cfg.sample.resize) == (facts["cfg_scale"], facts["resize"])
    assert cfg.model.preset == facts["preset"] and tuple(cfg.model.grid) == (facts["px"] // 16,) * 2
    if facts["kind"] == "dpar" and path.parent.name != "ablations":
        p = cfg.model.patch
        assert (p.mode, p.alignment, p.threshold, p.max_patch_length, p.row_reset) == \
            ("global", "reference", facts["threshold"], 4, True)

    # the data it names: the model must fit it, and 300 epochs of ImageNet are 300 x 1,281,167 images (one of the
    # ten views each time, LlamaGen's epoch), not 300 x the 12.8M code rows
    assert cfg.data.codes_dir in DATASETS, f"{rel(path)} names data no runbook step writes: {cfg.data.codes_dir}"
    standin = stand_ins[cfg.data.codes_dir]
    cfg = load_config(path, [f"data.codes_dir={standin}"])
    line = check_data_at_launch(cfg)
    steps = math.ceil(facts["epochs"] * IMAGENET_IMAGES / 256)
    assert cfg.train.steps == steps and f"train.steps={steps:,}" in line

    # the model the paper reports, built on the meta device
    model_cfg = resolve_model_config(cfg.model)
    with torch.device("meta"):
        millions = count_params(build_model(model_cfg)) / 1e6
    reported = REPORTED_M.get(model_cfg.preset, {})
    if "authors_code" in reported or "paper" in reported:
        value = reported.get("authors_code", reported.get("paper"))
        assert abs(millions - value) <= reported_tolerance(value), (model_cfg.preset, millions, value)
    elif model_cfg.kind == "entropy":  # GPT-B's shape without the class embedding (1,001 x 768)
        assert abs(millions + 1001 * 768 / 1e6 - REPORTED_M["gpt-b"]["paper"]) <= 0.5
    else:  # DPAR-L / XXL: no count in the paper; the same total depth as LlamaGen's GPT, within 3% of its size
        baseline = REPORTED_M[model_cfg.preset.replace("dpar", "gpt")]["paper"]
        assert abs(millions / baseline - 1) < 0.03, (model_cfg.preset, millions, baseline)

    # the Slurm job a user would submit on 16 nodes x 8 GPUs: rendered, with the resolved steps in its config
    capsys.readouterr()
    code = slurm_cli.main(["--nodes", "16", "--gpus-per-node", "8", "--partition", "gpu", "--time", "48:00:00",
                           "--config", str(path), "--dry-run", f"data.codes_dir={standin}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --nodes=16" in out and "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --gpus-per-node=8" in out
    assert f"--config {path}" in out and "fits the model" in out
    resolved = yaml.safe_load(out.split("# resolved config", 1)[1].split("\n", 1)[1])
    assert resolved["train"]["steps"] == steps and resolved["model"]["preset"] == facts["preset"]


def test_a_config_on_the_wrong_data_is_refused_before_launch(stand_ins, slurm_cli, capsys):
    # a 384 px model pointed at the 256 px codes: refused at submission, naming the field to fix
    code = slurm_cli.main(["--nodes", "16", "--gpus-per-node", "8", "--config", str(PAPER / "dpar-xl-384.yaml"),
                           "--dry-run", f"data.codes_dir={stand_ins['data/imagenet/codes-256']}"])
    assert code == 2 and "model.grid=[24, 24] but the codes are on a [16, 16] grid" in capsys.readouterr().err


def test_ablation_files_say_what_the_paper_ablates():
    cfg = {p.stem: load_config(p).model.patch for p in (PAPER / "ablations").glob("*.yaml")}
    assert (cfg["static"].mode, cfg["static"].static_length, cfg["static"].row_reset) == ("static", 1.81, True)
    assert (cfg["entropy-only"].row_reset, cfg["entropy-only"].max_patch_length >= 256) == (False, True)
    assert (cfg["max-length"].row_reset, cfg["max-length"].max_patch_length) == (False, 4)
    assert (cfg["row-reset"].row_reset, cfg["row-reset"].max_patch_length, cfg["row-reset"].mode) == (True, 4,
                                                                                                     "global")
    # the static layout runs as many global positions as the dynamic rule's mean length 1.81: 141 patches
    lengths = patch_lengths(torch.zeros(1, 256), width=16, threshold=0.0, max_patch_length=4, mode="static",
                            static_length=cfg["static"].static_length)[0]
    assert len(lengths) == round(256 / 1.81)


def test_cost_estimate_matches_the_papers_saving(tmp_path, capsys):
    tool = load_tool("estimate")
    configs = [str(PAPER / f"{k}-xl-384.yaml") for k in ("gpt", "dpar")]
    out_json = tmp_path / "cost.json"
    args = [a for c in configs for a in ("--config", c)] + ["--gpus", "128", "--gpu", "h100", "--mfu", "0.4",
                                                            "--num-images", str(IMAGENET_IMAGES), "--json",
                                                            str(out_json)]
    assert tool.main(args) == 0
    printed = capsys.readouterr().out
    gpt, dpar = json.loads(out_json.read_text())["rows"]
    steps = math.ceil(300 * IMAGENET_IMAGES / 256)
    assert gpt["steps"] == dpar["steps"] == steps
    for row in (gpt, dpar):
        assert row["train_flops"] == pytest.approx(row["train_flops_per_image"] * steps * 256, rel=1e-12)
        assert row["gpu_hours"] == pytest.approx(row["train_flops"] / (989e12 * 0.4) / 3600, rel=1e-12)
        assert row["wall_clock_hours"] == pytest.approx(row["gpu_hours"] / 128, rel=1e-12)
        assert row["compute_ms_per_step"] == pytest.approx(row["wall_clock_hours"] * 3.6e6 / steps, rel=1e-12)
    # the paper: up to 40.4% fewer training FLOPs, at XL and 384 px (our count is within a point of it)
    assert dpar["saving"] == pytest.approx(0.404, abs=0.01)
    assert dpar["mean_patch_length"] == pytest.approx(2.06, abs=0.01) and dpar["layout_from"].startswith("paper")
    assert "dpar-xl-384.yaml" in printed and f"{100 * dpar['saving']:.1f}%" in printed

    # without the data or --num-images the estimate says what to pass
    assert tool.main(["--config", configs[0], "--gpus", "8", "--gpu", "h100",
                      f"data.codes_dir={tmp_path / 'none'}"]) == 2
    assert "pass --num-images" in capsys.readouterr().err


def test_cost_estimate_cuts_the_datas_own_entropies(tmp_path, capsys):
    # With entropies beside the codes the DPAR layout is the config's rule on them (here without row reset)
    codes = write_code_dataset(tmp_path / "codes", n_images=24, grid=(4, 4), vocab=32)
    tool = load_tool("estimate")
    overrides = [f"data.codes_dir={codes}", "model.preset=dpar-tiny", "model.vocab_size=32", "model.grid=[4,4]",
                 "model.patch.threshold=2.0", "model.patch.row_reset=false", "train.epochs=1", "data.batch_size=8"]
    out_json = tmp_path / "cost.json"
    assert tool.main(["--config", str(PAPER / "dpar-b-256.yaml"), "--gpus", "1", "--peak-tflops", "100",
                      "--json", str(out_json), *overrides]) == 0
    row = json.loads(out_json.read_text())["rows"][0]
    entropy = CodeData.open(str(codes), need_entropy=True).read_entropy(np.arange(24))
    lengths = patch_lengths(entropy, width=4, threshold=2.0, max_patch_length=4, row_reset=False)
    assert row["mean_patch_length"] == pytest.approx(24 * 16 / sum(map(len, lengths)), rel=1e-12)
    assert row["layout_from"] == "entropies of 24 rows" and row["train_images"] == 24 and row["steps"] == 3


def test_epochs_resolve_to_steps_in_a_real_run(tmp_path, capsys):
    # 64 rows that are 32 images x 2 views: one epoch is 32 samples, not 64 (LlamaGen counts source images)
    codes = write_code_dataset(tmp_path / "codes", n_images=64, grid=(4, 4), vocab=32, entropy=False)
    manifest = json.loads((codes / "manifest.json").read_text())
    manifest["augmentation"]["copies_per_image"], manifest["num_source_images"] = 2, 32
    S.write_manifest(str(codes), manifest)
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"data.codes_dir={codes}", "model.preset=gpt-tiny",
                             "model.dim=32", "model.n_heads=2", "model.n_layers=1", "model.vocab_size=32",
                             "model.num_classes=3", "model.grid=[4,4]", "data.batch_size=8", "data.val_fraction=0.25",
                             "train.epochs=1.5", "train.steps=1000", "train.progress_bar=false",
                             "wandb.enabled=false"])
    trainer = Trainer(cfg)
    # 32 images, 8 held out (with both their views) -> 24 training images; 1.5 x 24 / 8 = 4.5 -> 5 steps
    assert trainer.cfg.train.steps == 5 and "train.steps=5" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["steps"] == 5
    assert trainer.fit()["step"] == 5


def test_loader_cuts_patches_with_the_ablation_rules(code_dataset):
    data = CodeData.open(str(code_dataset), need_entropy=True)
    ids = np.arange(16)
    entropy = data.read_entropy(ids)
    for rule in (PatchConfig(threshold=2.0, max_patch_length=16, row_reset=False),
                 PatchConfig(mode="static", static_length=1.5, max_patch_length=4)):
        got = BatchSource(data, rule).make(ids).patch_lengths
        assert got == patch_lengths(entropy, width=4, threshold=rule.threshold, max_patch_length=rule.max_patch_length,
                                    mode=rule.mode, static_length=rule.static_length, row_reset=rule.row_reset)
    no_reset = BatchSource(data, PatchConfig(threshold=2.0, max_patch_length=16, row_reset=False)).make(ids)
    with_reset = BatchSource(data, PatchConfig(threshold=2.0, max_patch_length=16)).make(ids)
    assert no_reset.num_patches < with_reset.num_patches  # some patch crosses a row end


def test_samplers_take_the_runs_guidance_and_resize_unless_told_otherwise():
    from argparse import Namespace

    from dpar_scale.sampling.options import apply_config_defaults

    cfg = load_config(PAPER / "dpar-xl-384.yaml")
    args = Namespace(cfg_scale=None, resize=None)
    apply_config_defaults(args, cfg)
    assert (args.cfg_scale, args.resize) == (1.75, 256)
    args = Namespace(cfg_scale=3.0, resize=0)  # flags given: kept
    apply_config_defaults(args, cfg)
    assert (args.cfg_scale, args.resize) == (3.0, 0)
    args = Namespace(cfg_scale=None)  # tools/sample.py has no --resize
    apply_config_defaults(args, load_config(None))
    assert args.cfg_scale == 2.0 and not hasattr(args, "resize")
