"""tools/compute_entropy.py and tools/calibrate_threshold.py on a trained tiny entropy model."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpar_scale.checkpoint.export import load_model_for_inference
from dpar_scale.data.shards import CodeShards
from dpar_scale.data.side_arrays import open_side_array
from dpar_scale.launch import free_port
from dpar_scale.patching.entropy import code_entropies
from dpar_scale.patching.rule import mean_patch_length, patch_starts
from dpar_scale.train.trainer import Trainer

from conftest import write_code_dataset
from test_trainer import make_cfg
from tolerances import abs_tol, eps, magnitude, model_chain

ROOT = Path(__file__).resolve().parent.parent


def tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ent")
    codes = write_code_dataset(tmp / "codes", n_images=60, shard_size=16, entropy=False)
    result = Trainer(make_cfg(tmp, codes, "entropy", "train.steps=15")).fit()
    return codes, Path(result["checkpoint"])


def test_entropies_match_the_model_and_are_aligned(trained):
    codes_dir, ckpt = trained
    assert tool("compute_entropy").main(["--checkpoint", str(ckpt), "--codes", str(codes_dir),
                                         "--batch-size", "7"]) == 0
    shards = CodeShards(str(codes_dir))
    stored = open_side_array(str(codes_dir / "entropy"), shards)
    assert stored.manifest["entropy_checkpoint"] == str(ckpt.resolve())
    model, _ = load_model_for_inference(ckpt)
    codes = torch.from_numpy(shards.codes(slice(0, len(shards))).astype(np.int64))
    expected = code_entropies(model, codes).numpy()
    # Stored as float16: rounding to nearest is within half an ulp, at most eps16/2 of the value; the tool's
    # batches of 7 against one batch here add float32 rounding of the forward and the entropy's sum over 32 codes.
    chain = model_chain(model, 32)
    f32 = abs_tol(magnitude(expected), reduction=chain["reduction"], depth=chain["depth"] + 1)
    np.testing.assert_allclose(stored[np.arange(len(shards))].astype(np.float32), expected,
                               rtol=eps(torch.float16) / 2, atol=f32)
    assert expected.max() <= np.log(32) + abs_tol(np.log(32), reduction=32)  # at most ln V, up to rounding
    # entry k is the entropy of the prediction of code k from codes < k: changing code k moves no entry <= k
    k = 7
    changed = codes.clone()
    changed[:, k] = (changed[:, k] + 1) % 32
    again = code_entropies(model, changed).numpy()
    np.testing.assert_allclose(again[:, : k + 1], expected[:, : k + 1], rtol=0, atol=f32)
    assert np.abs(again[:, k + 1:] - expected[:, k + 1:]).max() > 100 * f32


def test_entropy_is_resumable(trained, tmp_path):
    codes_dir, ckpt = trained
    out = tmp_path / "ent"
    run = ["--checkpoint", str(ckpt), "--codes", str(codes_dir), "--out", str(out)]
    assert tool("compute_entropy").main(run) == 0
    files = sorted(out.glob("shard_*.entropy.npy"))
    assert len(files) == 4
    before = {f.name: (os.stat(f).st_mtime_ns, f.read_bytes()) for f in files}
    files[2].unlink()
    (out / "manifest.json").unlink()
    assert tool("compute_entropy").main(run) == 0
    after = {f.name: (os.stat(f).st_mtime_ns, f.read_bytes()) for f in sorted(out.glob("shard_*.entropy.npy"))}
    assert after.keys() == before.keys()
    for name in before:
        if name == files[2].name:
            assert after[name][1] == before[name][1]  # rebuilt, identical
        else:
            assert after[name] == before[name]  # untouched


def test_entropy_rejects_a_model_that_is_not_an_entropy_model(trained, tmp_path, capsys):
    codes_dir, _ = trained
    gpt = Trainer(make_cfg(tmp_path, codes_dir, "gpt", "train.steps=1")).fit()
    assert tool("compute_entropy").main(["--checkpoint", gpt["checkpoint"], "--codes", str(codes_dir),
                                         "--out", str(tmp_path / "x")]) == 2
    assert "model.kind=entropy" in capsys.readouterr().err


def test_two_process_entropy_equals_one_process(trained, tmp_path):
    codes_dir, ckpt = trained
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tools" / "compute_entropy.py"), "--checkpoint", str(ckpt), "--codes", str(codes_dir),
           "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert tool("compute_entropy").main(["--checkpoint", str(ckpt), "--codes", str(codes_dir),
                                         "--out", str(tmp_path / "one")]) == 0
    shards = CodeShards(str(codes_dir))
    one = open_side_array(str(tmp_path / "one"), shards)
    two = open_side_array(str(tmp_path / "two"), shards)
    np.testing.assert_array_equal(one[np.arange(len(shards))], two[np.arange(len(shards))])


def test_calibration_tool(trained, tmp_path):
    codes_dir, ckpt = trained
    out = tmp_path / "ent"
    assert tool("compute_entropy").main(["--checkpoint", str(ckpt), "--codes", str(codes_dir),
                                         "--out", str(out)]) == 0
    assert tool("calibrate_threshold").main(["--entropy", str(out), "--target-mean-length", "1.5",
                                             "--max-patch-length", "4", "--json", str(tmp_path / "t.json")]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    # No θ does better: the mean length only changes where θ crosses a stored entropy, so trying every one of them
    # (and one below all) tries every achievable mean.
    e = torch.from_numpy(open_side_array(str(out))[np.arange(60)].astype(np.float32))
    achievable = [mean_patch_length(patch_starts(e, width=4, threshold=float(t), max_patch_length=4))
                  for t in torch.cat([e.min()[None] - 1, torch.unique(e)])]
    assert result["mean_patch_length"] in achievable
    assert abs(result["mean_patch_length"] - 1.5) == min(abs(m - 1.5) for m in achievable)
    assert sum(int(k) * v for k, v in result["histogram"].items()) == 60 * 16
    assert tool("calibrate_threshold").main(["--entropy", str(out), "--target-mean-length", "9",
                                             "--max-patch-length", "4"]) == 2


def test_entropy_tools_check_what_they_read(trained, tmp_path, capsys):
    """compute_entropy checks the codes at open; a code shard rebuilt with other codes gets its entropies
    recomputed (and no other); calibrate_threshold refuses NaN entropies."""
    import shutil

    from dpar_scale.data import shards as S
    from dpar_scale.data import side_arrays as SA

    codes_dir, ckpt = trained
    codes = Path(shutil.copytree(codes_dir, tmp_path / "codes"))
    out = tmp_path / "ent"
    run = ["--checkpoint", str(ckpt), "--codes", str(codes), "--out", str(out)]
    assert tool("compute_entropy").main(run) == 0
    before = {f.name: f.read_bytes() for f in out.glob("shard_*.entropy.*")}
    manifest = json.loads((codes / "manifest.json").read_text())
    shard = manifest["shards"][1]
    rows = np.load(codes / shard["files"]["codes"])
    labels = np.load(codes / shard["files"]["labels"])
    manifest["shards"][1] = S.write_code_shard(str(codes), 1, (rows + 1) % 32, labels)  # as if re-extracted
    S.write_manifest(str(codes), manifest)
    assert tool("compute_entropy").main(run) == 0
    after = {f.name: f.read_bytes() for f in out.glob("shard_*.entropy.*")}
    assert [n for n in sorted(before) if after[n] != before[n]] == ["shard_00001.entropy.json",
                                                                     "shard_00001.entropy.npy"]
    bad = np.load(codes / shard["files"]["codes"], mmap_mode="r+")
    bad[3, 2] = 40  # outside the 32 codes, edited in place
    bad.flush()
    del bad
    capsys.readouterr()
    assert tool("compute_entropy").main(run) == 2
    assert "shard_00001.codes.npy does not match the sha256" in capsys.readouterr().err
    assert tool("compute_entropy").main(run + ["--verify", "size"]) == 2
    assert "row 3 (row 19 of the data set) at position 2 holds code 40" in capsys.readouterr().err
    values = np.load(out / "shard_00002.entropy.npy")
    values[0, 0] = np.nan
    SA.write_side_shard(str(out), 2, values)  # as if the entropy model had written it
    SA.write_side_manifest(str(out), S.CodeShards(str(codes)), extra={"grid": [4, 4]})
    assert tool("calibrate_threshold").main(["--entropy", str(out), "--target-mean-length", "1.5"]) == 2
    assert "shard_00002.entropy.npy: row 0 (row 32 of the data set) at position 0 holds entropy nan" in \
        capsys.readouterr().err
