"""A resume checks that the checkpoint fits before loading anything: model shape, data identity, file integrity."""
import json
import re
import shutil

import pytest

from dpar_scale.checkpoint.save_load import CheckpointError, list_checkpoints
from dpar_scale.config import ConfigError
from dpar_scale.train.trainer import Trainer

from conftest import write_code_dataset
from test_trainer import make_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(codes folder, run folder) of a 2-step gpt run with checkpoints at steps 1 and 2, trained once."""
    root = tmp_path_factory.mktemp("resume_checks")
    codes = write_code_dataset(root / "codes")
    Trainer(make_cfg(root, codes, "gpt", "train.steps=2", "checkpoint.interval=1")).fit()
    return codes, root / "gpt"


@pytest.fixture
def run(tmp_path, trained):
    """A private copy of the trained run (tests corrupt files); returns (codes, tmp_path holding gpt/)."""
    codes, run_dir = trained
    shutil.copytree(run_dir, tmp_path / "gpt")
    return codes, tmp_path


def resume(tmp_path, codes, *extra):
    return Trainer(make_cfg(tmp_path, codes, "gpt", "train.steps=3", "checkpoint.resume=auto", *extra))


def test_checkpoint_records_its_data(run):
    codes, tmp_path = run
    info = json.loads((list_checkpoints(tmp_path / "gpt")[-1] / "data.json").read_text())
    assert info["codes_dir"] == str(codes) and len(info["codes_fingerprint"]) == 64
    assert resume(tmp_path, codes).state.step == 2  # same config and data: resumes


def test_model_dim_mismatch_names_both_values(run):
    codes, tmp_path = run
    with pytest.raises(ConfigError, match=r"model\.dim: checkpoint 32, config 64 — resume with the checkpoint's "
                                          r"model config .* new run\.output_dir"):
        resume(tmp_path, codes, "model.dim=64")


def test_num_classes_mismatch(run):
    codes, tmp_path = run
    with pytest.raises(ConfigError, match=r"model\.num_classes: checkpoint 3, config 5"):
        resume(tmp_path, codes, "model.num_classes=5")


def test_vocab_mismatch_from_a_dataset_with_another_vocab(run):
    codes, tmp_path = run
    other = write_code_dataset(tmp_path / "codes64", vocab=64, entropy=False)
    with pytest.raises(ConfigError, match=r"model\.vocab_size: checkpoint 32, config 64"):
        resume(tmp_path, other, "model.vocab_size=64")


def test_different_codes_refused_unless_allowed(run):
    codes, tmp_path = run
    other = write_code_dataset(tmp_path / "codes_b", seed=1, entropy=False)
    with pytest.raises(ConfigError, match=r"trained on codes .*codes \(fingerprint .*data\.codes_dir now points "
                                          r"to different codes .*allow_data_change=true"):
        resume(tmp_path, other)
    with pytest.warns(UserWarning, match="allow_data_change"):
        trainer = resume(tmp_path, other, "checkpoint.allow_data_change=true")
    assert trainer.state.step == 2
    # the same codes copied elsewhere are the same data (fingerprints, not paths)
    moved = tmp_path / "codes_moved"
    shutil.copytree(codes, moved)
    assert resume(tmp_path, moved).state.step == 2


def test_different_entropies_refused(tmp_path, code_dataset):
    import numpy as np

    from dpar_scale.data import shards as S

    from dpar_scale.data import side_arrays as SA

    Trainer(make_cfg(tmp_path, code_dataset, "dpar", "train.steps=1")).fit()
    other = tmp_path / "codes_b"
    shutil.copytree(code_dataset, other)
    shutil.rmtree(other / "entropy")
    shards = S.CodeShards(str(other))
    for rec in shards.shards:
        start = shards.shard_range(rec["index"])[0]
        ent = np.full((rec["count"], 16), 3.0 + start % 2, dtype=np.float16)
        SA.write_side_shard(str(other / "entropy"), rec["index"], ent)
    SA.write_side_manifest(str(other / "entropy"), shards, extra={"grid": [4, 4]})
    with pytest.raises(ConfigError, match=r"trained with entropies .* differ"):
        Trainer(make_cfg(tmp_path, other, "dpar", "train.steps=2", "checkpoint.resume=auto"))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["model/__0_0.distcp", "optimizer/__0_0.distcp", "model/.metadata",
                                  "train_state.pt"])
def test_truncated_file_is_named_and_older_checkpoints_offered(run, name):
    codes, tmp_path = run
    newest, older = list_checkpoints(tmp_path / "gpt")[-1], list_checkpoints(tmp_path / "gpt")[0]
    truncate(newest / name)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(newest / name))}.*corrupt or truncated.*"
                                              rf"checkpoint\.resume={older}.*step-000001") as err:
        resume(tmp_path, codes)  # auto does not silently fall back to step 1
    assert "step-000002" in str(err.value)
    # the suggested older checkpoint resumes
    assert resume(tmp_path, codes, f"checkpoint.resume={older}").state.step == 1


@pytest.mark.parametrize("name", ["model/__0_0.distcp", "optimizer/__0_0.distcp", "rng/rank-00000.pt"])
def test_corrupt_file_of_the_same_size_is_caught_by_its_checksum(run, name):
    codes, tmp_path = run
    newest, older = list_checkpoints(tmp_path / "gpt")[-1], list_checkpoints(tmp_path / "gpt")[0]
    data = bytearray((newest / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the tensor data: sizes and headers stay valid
    (newest / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(newest / name))} does not match the sha256.*"
                                              rf"checkpoint\.resume={older}"):
        resume(tmp_path, codes)


def test_truncated_file_without_older_checkpoint(run):
    codes, tmp_path = run
    first = list_checkpoints(tmp_path / "gpt")[0]
    truncate(first / "train_state.pt")
    with pytest.raises(CheckpointError, match=r"train_state\.pt.*no older complete checkpoint"):
        resume(tmp_path, codes, f"checkpoint.resume={first}")


# ------------------------------------------------------------------------------------- DPAR structure
LEGACY = ["model.dpar.decoder_injection=first", "model.dpar.cross_attn_ffn=true"]


def as_written_before_model_dpar(checkpoint):
    """Rewrites the checkpoint's config.yaml as the code before model.dpar wrote it (no `dpar` section) and
    records the file's new size and sha256 in complete.json, as that save would have."""
    import yaml

    from dpar_scale.checkpoint.save_load import MARKER, sha256_file

    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    del config["model"]["dpar"]
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    marker = json.loads((checkpoint / MARKER).read_text())
    marker["files"]["config.yaml"] = {"bytes": (checkpoint / "config.yaml").stat().st_size,
                                      "sha256": sha256_file(checkpoint / "config.yaml")}
    (checkpoint / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def test_checkpoint_from_before_model_dpar_is_the_legacy_structure(tmp_path, code_dataset):
    import torch

    from dpar_scale.checkpoint.export import consolidated_weights, export_checkpoint, load_model_for_inference

    Trainer(make_cfg(tmp_path, code_dataset, "dpar", "train.steps=1", *LEGACY)).fit()
    checkpoint = list_checkpoints(tmp_path / "dpar")[-1]
    weights = consolidated_weights(checkpoint, use_ema=False)[0]
    assert "global_to_local.weight" in weights and "patch_cross_attn.feed_forward.w1.weight" in weights
    as_written_before_model_dpar(checkpoint)

    model, cfg = load_model_for_inference(checkpoint, use_ema=False)
    assert (cfg.model.dpar.decoder_injection, cfg.model.dpar.cross_attn_ffn) == ("first", True)
    assert (model.decoder_injection, model.cross_attn_ffn) == ("first", True)
    state = model.state_dict()
    assert sorted(state) == sorted(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
    # its export states the structure (config.json) and loads as the same model
    export_checkpoint(checkpoint, tmp_path / "export", use_ema=False)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model"]["dpar"] == {
        "decoder_injection": "first", "cross_attn_ffn": True}
    exported, _ = load_model_for_inference(tmp_path / "export")
    assert all(torch.equal(exported.state_dict()[k], weights[k]) for k in weights)

    # Resuming it with today's defaults (the authors' structure) names the keys that resume it ...
    with pytest.raises(ConfigError, match=r"model\.dpar\.decoder_injection: checkpoint first, config every; "
                                          r"model\.dpar\.cross_attn_ffn: checkpoint true, config false — .*"
                                          r"here: model\.dpar\.decoder_injection=first "
                                          r"model\.dpar\.cross_attn_ffn=true"):
        Trainer(make_cfg(tmp_path, code_dataset, "dpar", "train.steps=2", "checkpoint.resume=auto"))
    # ... and with them it resumes (files intact, weights loaded into the legacy modules).
    trainer = Trainer(make_cfg(tmp_path, code_dataset, "dpar", "train.steps=2", "checkpoint.resume=auto", *LEGACY))
    assert trainer.state.step == 1


def test_checkpoint_of_the_authors_structure_refuses_the_legacy_one(tmp_path, code_dataset):
    Trainer(make_cfg(tmp_path, code_dataset, "dpar", "train.steps=1")).fit()
    with pytest.raises(ConfigError, match=r"model\.dpar\.decoder_injection: checkpoint every, config first.*"
                                          r"here: model\.dpar\.decoder_injection=every"):
        Trainer(make_cfg(tmp_path, code_dataset, "dpar", "train.steps=2", "checkpoint.resume=auto",
                         "model.dpar.decoder_injection=first"))
    # a GPT's config also carries model.dpar, which does not describe it: no mismatch for the token models
    gpt_run = tmp_path / "gpt_run"
    Trainer(make_cfg(gpt_run, code_dataset, "gpt", "train.steps=1")).fit()
    as_written_before_model_dpar(list_checkpoints(gpt_run / "gpt")[-1])
    assert Trainer(make_cfg(gpt_run, code_dataset, "gpt", "train.steps=2", "checkpoint.resume=auto")).state.step == 1
