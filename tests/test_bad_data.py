"""Bad data never trains silently: damaged copies of a small shard folder fail when the data is opened, naming the
file, the row and the value and how to rebuild that shard; verified files are cached without hiding a change."""
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from dpar_scale import integrity
from dpar_scale.cli import entry_point
from dpar_scale.data import shards as S
from dpar_scale.data import side_arrays as SA
from dpar_scale.data.checks import check_entropy_values, entropy_bounds
from dpar_scale.data.loader import CodeData, GlobalOrder
from dpar_scale.data.shards import ShardError
from dpar_scale.train.trainer import Trainer

from conftest import write_code_dataset
from parallel_helpers import REPO, torchrun
from test_trainer import make_cfg

VOCAB, CLASSES = 512, 10  # the demo's tokenizer and classes; shards of 24 rows: 0-23, 24-47, 48-63


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_code_dataset(tmp_path_factory.mktemp("pristine") / "codes", vocab=VOCAB, num_classes=CLASSES)


@pytest.fixture
def copy(pristine, tmp_path):
    """A private copy of the shard folder to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "codes"))


def trainer(tmp_path, codes, kind="gpt", *extra):
    return Trainer(make_cfg(tmp_path, codes, kind, f"model.vocab_size={VOCAB}", f"model.num_classes={CLASSES}",
                            *extra))


def rewrite_code_shard(folder: Path, k: int, edit) -> None:
    """Shard k rewritten with `edit(codes, labels)` applied and its checksums updated in the manifest: data written
    bad in the first place, so only the value checks can tell."""
    manifest = json.loads((folder / "manifest.json").read_text())
    files = manifest["shards"][k]["files"]
    codes, labels = np.load(folder / files["codes"]).copy(), np.load(folder / files["labels"]).copy()
    edit(codes, labels)
    manifest["shards"][k] = S.write_code_shard(str(folder), k, codes, labels)
    S.write_manifest(str(folder), manifest)


def rewrite_entropy_shard(folder: Path, k: int, edit) -> None:
    side = folder / "entropy"
    values = np.load(side / f"shard_{k:05d}.entropy.npy").copy()
    edit(values)
    SA.write_side_shard(str(side), k, values)
    SA.write_side_manifest(str(side), S.CodeShards(str(folder)), extra={"grid": [4, 4]})


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------- the table
def test_one_flipped_byte_in_a_codes_shard_fails_at_open(copy, tmp_path):
    path = copy / "shard_00001.codes.npy"
    size = path.stat().st_size
    flip_middle_byte(path)
    assert path.stat().st_size == size
    with pytest.raises(ShardError, match=rf"{re.escape(str(path))} does not match the sha256 .* corrupt.*"
                                         rf"delete {re.escape(str(copy / 'shard_00001.json'))} and re-run "
                                         rf".*tools/extract_codes.py"):
        trainer(tmp_path, copy)
    # data.verify=size skips the hash (the flipped bit leaves every code in range): the trade-off it makes
    trainer(tmp_path, copy, "gpt", "data.verify=size", "train.steps=1")


@pytest.mark.parametrize("how", ["written so", "edited in place, data.verify=size"])
def test_a_column_of_codes_out_of_the_vocabulary(copy, tmp_path, how):
    if how == "written so":
        rewrite_code_shard(copy, 1, lambda codes, labels: codes.__setitem__((slice(None), 5), 60000))
        extra = []
    else:
        array = np.load(copy / "shard_00001.codes.npy", mmap_mode="r+")
        array[:, 5] = 60000
        array.flush()
        del array
        extra = ["data.verify=size"]
    with pytest.raises(ShardError, match=r"shard_00001\.codes\.npy: row 0 \(row 24 of the data set\) at position 5 "
                                         r"holds code 60000, outside the vocabulary \[0, 512\); to rebuild only this "
                                         r"shard, delete .*shard_00001\.json and re-run"):
        trainer(tmp_path, copy, "gpt", *extra)


def test_labels_outside_the_classes(copy, tmp_path):
    rewrite_code_shard(copy, 2, lambda codes, labels: labels.__setitem__(slice(None), 57))
    with pytest.raises(ShardError, match=r"shard_00002\.labels\.npy: row 0 \(row 48 of the data set\) holds label "
                                         r"57, outside the 10 classes \[0, 10\) or the null class 10"):
        trainer(tmp_path, copy)


def test_the_null_class_is_a_label_only_where_the_model_has_one(copy):
    rewrite_code_shard(copy, 0, lambda codes, labels: labels.__setitem__(3, CLASSES))
    CodeData.open(str(copy), allow_null_label=True)  # class-conditional models: the unconditional (CFG) label
    with pytest.raises(ShardError, match=r"row 3 \(row 3 of the data set\) holds label 10, outside the 10 classes "
                                         r"\[0, 10\);"):
        CodeData.open(str(copy))


def test_a_column_of_nan_entropies(copy, tmp_path):
    rewrite_entropy_shard(copy, 2, lambda e: e.__setitem__((slice(None), 9), np.nan))
    command = (f"python tools/compute_entropy.py --checkpoint CHECKPOINT --codes {copy} --out {copy / 'entropy'}")
    with pytest.raises(ShardError, match=r"shard_00002\.entropy\.npy: row 0 \(row 48 of the data set\) at position 9 "
                                         r"holds entropy nan; entropies must be finite and in \[0, ln 512 = 6\.2383\] "
                                         rf"nats; to rebuild only this shard, delete .*shard_00002\.entropy\.json and "
                                         rf"re-run {re.escape(command)}"):
        trainer(tmp_path, copy, "dpar")


def test_entropy_bounds_allow_float16_rounding_only():
    lo, hi = entropy_bounds(VOCAB)
    ln = np.log(VOCAB)
    fine = np.array([[0.0, -0.0, np.float32(ln), ln * (1 + 1e-6), -1e-6]], np.float32)
    assert check_entropy_values(fine.astype(np.float16), VOCAB) is None  # float16 storage of real entropies
    assert check_entropy_values(fine, VOCAB) is None
    for bad in (np.nan, np.inf, -np.inf, ln + 0.05, -0.05):
        for dtype in (np.float16, np.float32):
            row = np.zeros((2, 4), dtype)
            row[1, 2] = bad
            assert check_entropy_values(row, VOCAB) == (1, 2), (bad, dtype)
    assert -0.01 < lo < 0 and ln < hi < ln + 0.01


def load(relative: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(relative).stem + "_cli", REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_counting_refuses_nan_entropies(copy, tmp_path, capsys):
    count_flops = load("tools/count_flops.py")
    common = ["--model", "dpar-tiny", "--baseline", "gpt-tiny", "--vocab", str(VOCAB), "--classes", str(CLASSES)]
    rewrite_entropy_shard(copy, 1, lambda e: e.__setitem__((4, 0), np.nan))
    assert count_flops.main(common + ["--entropies", str(copy / "entropy")]) == 2
    assert "shard_00001.entropy.npy: row 4 (row 28 of the data set) at position 0 holds entropy nan" in \
        capsys.readouterr().err
    np.save(tmp_path / "e.npy", np.load(copy / "entropy" / "shard_00001.entropy.npy"))
    assert count_flops.main(common + ["--entropies", str(tmp_path / "e.npy")]) == 2
    assert "row 4 holds entropy nan at position 0" in capsys.readouterr().err


def test_launcher_with_zero_nodes_is_one_line(capsys):
    slurm = load("launchers/slurm.py")
    assert slurm.main(["--config", str(REPO / "configs/demo/dpar.yaml"), "--nodes", "0", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == "error: argument --nodes: must be an integer >= 1, got 0 (see slurm.py --help)\n"


def test_missing_codes_dir_is_one_line_without_traceback(capsys):
    train = load("train.py")
    assert train.main(["--config", str(REPO / "configs/demo/gpt.yaml"), "data.codes_dir=/nonexistent",
                       "wandb.enabled=false"]) == 2
    assert capsys.readouterr().err == "error: code shards folder '/nonexistent' does not exist\n"


def test_a_bad_row_the_first_steps_would_not_draw_fails_at_open(tmp_path):
    """Row 7 of shard 2 (shards of 16 rows: row 39): a 2-step run never reads it, and still must not start."""
    codes = write_code_dataset(tmp_path / "codes", vocab=VOCAB, num_classes=CLASSES, shard_size=16, entropy=False)
    train_ids = CodeData.open(str(codes), val_fraction=0.125).train_ids  # make_cfg's split
    assert 39 in train_ids and 39 not in GlobalOrder(train_ids, seed=0).ids(0, 2 * 8)  # 2 steps of 8 images
    rewrite_code_shard(codes, 2, lambda c, labels: c.__setitem__((7, 11), VOCAB))
    with pytest.raises(ShardError, match=r"shard_00002\.codes\.npy: row 7 \(row 39 of the data set\) at position 11 "
                                         r"holds code 512"):
        trainer(tmp_path, codes, "gpt", "train.steps=2")


# ------------------------------------------------------------------------------------- the verified cache
def backdate(folder: Path, seconds: float) -> None:
    """Files older than integrity.RACY_SECONDS, as a data set is by the time it is trained on."""
    stamp = time.time() - seconds
    for path in folder.rglob("*.npy"):
        os.utime(path, (stamp, stamp))


def test_verified_files_are_not_hashed_again_and_a_change_is_caught(copy, monkeypatch):
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    n_files = len(list(copy.rglob("*.npy")))  # codes + labels of 3 shards, 3 entropy shards
    backdate(copy, 0)
    CodeData.open(str(copy), need_entropy=True)
    assert len(hashed) == n_files  # just written: too recent to be cached (its mtime may not move on a rewrite)
    backdate(copy, 60)
    hashed.clear()
    CodeData.open(str(copy), need_entropy=True)
    assert len(hashed) == n_files
    hashed.clear()
    CodeData.open(str(copy), need_entropy=True)
    assert hashed == []  # the second run on unchanged files re-hashes nothing
    # same size, new bytes, new mtime: re-hashed, caught
    path = copy / "shard_00002.codes.npy"
    flip_middle_byte(path)
    stamp = time.time() - 30
    os.utime(path, (stamp, stamp))
    with pytest.raises(ShardError, match="shard_00002.codes.npy does not match the sha256"):
        CodeData.open(str(copy), need_entropy=True)
    assert hashed == ["shard_00002.codes.npy"]  # the changed file alone
    # ... and also with the old mtime put back (touch -r): the ctime still moved
    flip_middle_byte(path)  # the original bytes again: verified and cached
    os.utime(path, (stamp - 30, stamp - 30))
    CodeData.open(str(copy), need_entropy=True)
    stat = path.stat()
    flip_middle_byte(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(ShardError, match="shard_00002.codes.npy does not match the sha256"):
        CodeData.open(str(copy), need_entropy=True)


def test_a_cache_that_cannot_be_written_only_costs_time(copy, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("DPAR_CACHE_DIR", str(blocker))
    backdate(copy, 60)
    CodeData.open(str(copy), need_entropy=True)
    CodeData.open(str(copy), need_entropy=True)


# ----------------------------------------------------------------------------- two ranks share the work
RANKS_SCRIPT = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from dpar_scale import integrity
from dpar_scale.cli import entry_point
from dpar_scale.data.loader import CodeData
from dpar_scale.parallel import process_group as pg

@entry_point
def main():
    pg.init_process_group(backend="gloo")
    hashed = []
    real = integrity.sha256_file
    integrity.sha256_file = lambda path, *a: hashed.append(os.path.basename(path)) or real(path, *a)
    CodeData.open({good!r}, need_entropy=True, share=pg.work_share())
    Path({out!r}, f"rank{{pg.get_rank()}}.json").write_text(json.dumps(hashed))
    CodeData.open({bad!r}, share=pg.work_share())
    return 0

sys.exit(main())
"""


def test_two_ranks_split_the_hashing_and_report_one_error(pristine, tmp_path):
    good, bad = Path(shutil.copytree(pristine, tmp_path / "good")), Path(shutil.copytree(pristine, tmp_path / "bad"))
    backdate(good, 60)
    rewrite_code_shard(bad, 2, lambda codes, labels: codes.__setitem__((7, 11), VOCAB))
    script = tmp_path / "open_on_two_ranks.py"
    script.write_text(RANKS_SCRIPT.format(repo=str(REPO), good=str(good), bad=str(bad), out=str(tmp_path)))
    done = torchrun(2, [str(script)], timeout=240)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, done.stderr[-3000:]  # rank 0's; rank 1 raised the same error and stayed quiet
    assert f'File "{script}"' not in done.stderr and "ShardError" not in done.stderr  # (torchrun's own report follows)
    assert re.match(r"error: 1 bad code shard file\(s\) in .*bad: .*shard_00002\.codes\.npy: row 7 ", errors[0])
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    every = sorted(p.name for p in good.rglob("*.npy"))
    assert sorted(per_rank[0] + per_rank[1]) == every  # each file hashed once, by one rank
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 2  # codes/labels and entropy files split about evenly
    for folder in (good, good / "entropy"):  # rank 0 recorded what both ranks verified
        cached = json.loads(Path(integrity.VerifiedCache(str(folder)).path).read_text())["files"]
        assert sorted(cached) == sorted(str(p) for p in folder.glob("*.npy"))


# ------------------------------------------------------------------------------------------ the helper
def test_a_bug_keeps_its_traceback_and_user_errors_are_one_line(capsys, monkeypatch):
    @entry_point
    def buggy(argv=None):
        return {}["missing"]

    @entry_point
    def user_mistake(argv=None):
        raise ShardError("two\n  lines")

    @entry_point
    def opens_a_file_it_never_wrote(argv=None):
        return open("/nonexistent/dpar-scale-internal.json")

    with pytest.raises(KeyError):
        buggy()
    with pytest.raises(FileNotFoundError):  # a bare OSError from our code is a bug, not the user's missing file
        opens_a_file_it_never_wrote()
    assert user_mistake() == 2 and capsys.readouterr().err == "error: two; lines\n"
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 says it
    assert user_mistake() == 2 and capsys.readouterr().err == ""

    class RankLocal(ShardError):
        shared = False

    @entry_point
    def local_mistake(argv=None):
        raise RankLocal("only here")

    assert local_mistake() == 2 and capsys.readouterr().err == "error (rank 1): only here\n"
