"""Typed config: YAML + dotted overrides, rejected with the dotted key named."""
import pytest
import yaml

from dpar_scale.config import (LEGACY_DPAR, Config, ConfigError, load_config, load_saved_config, save_config,
                               to_dict)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"kind": "gpt", "dim": 32, "patch": {"threshold": 7.9}},
                                    "train": {"steps": 5}}))
    cfg = load_config(path, ["model.dim=64", "optim.lr=3e-4", "model.grid=[24,24]", "train.precision=bf16",
                             "optim.betas=[0.9,0.99]", "data.log_sample_ids=true"])
    assert isinstance(cfg, Config)
    assert cfg.model.kind == "gpt" and cfg.model.dim == 64 and cfg.train.steps == 5
    assert cfg.model.patch.threshold == 7.9 and cfg.model.grid == (24, 24)
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.99) and cfg.data.log_sample_ids is True


@pytest.mark.parametrize("override, message", [
    ("model.dimm=3", "model.dimm"),
    ("model.dim=abc", "model.dim"),
    ("model.dim=1.5", "model.dim"),
    ("train.precision=fp8", "train.precision"),
    ("nonsense=1", "nonsense"),
    ("model.patch=3", "model.patch"),
    ("model.grid=[16]", "model.grid"),
    ("train.steps=0", "train.steps"),
    ("parallel.dp_shard=0", "parallel.dp_shard"),
    ("model.kind", "dotted.key=value"),
    ("model.dpar.decoder_injection=last", "model.dpar.decoder_injection"),
    ("model.dpar.cross_attn_ffn=maybe", "model.dpar.cross_attn_ffn"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.dim=48", "run.output_dir=/tmp/x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_dpar_structure_defaults_and_legacy_saved_configs(tmp_path):
    # New runs build the authors' structure; a config saved before model.dpar existed means the legacy one, and a
    # saved config that has the section keeps what it says.
    cfg = load_config(None, ["model.preset=dpar-b"])
    assert (cfg.model.dpar.decoder_injection, cfg.model.dpar.cross_attn_ffn) == ("every", False)
    save_config(cfg, tmp_path / "new.yaml")
    assert to_dict(load_saved_config(tmp_path / "new.yaml")) == to_dict(cfg)
    old = to_dict(cfg)
    del old["model"]["dpar"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    legacy = load_saved_config(tmp_path / "old.yaml")
    assert to_dict(legacy.model.dpar) == LEGACY_DPAR == {"decoder_injection": "first", "cross_attn_ffn": True}
    assert load_config(tmp_path / "old.yaml").model.dpar.decoder_injection == "every"  # a run config: defaults
    with pytest.raises(ConfigError, match="does not exist"):
        load_saved_config(tmp_path / "missing.yaml")


def test_model_kind_comes_from_the_preset():
    from dpar_scale.models import resolve_model_config

    assert resolve_model_config(load_config(None, ["model.preset=gpt-b"]).model).kind == "gpt"
    resolved = resolve_model_config(load_config(None, ["model.preset=dpar-xl"]).model)
    assert (resolved.kind, resolved.dim, resolved.n_global_layers) == ("dpar", 1280, 30)
    with pytest.raises(ConfigError, match="model.kind is not set"):
        resolve_model_config(load_config(None, []).model)
    with pytest.raises(ConfigError, match="does not fit"):
        resolve_model_config(load_config(None, ["model.preset=gpt-b", "model.kind=dpar"]).model)


def test_include_merges_files_in_order_then_the_file_itself(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "recipe.yaml").write_text("optim:\n  lr: 3.0e-4\n  weight_decay: 0.1\nmodel:\n"
                                                   "  grid: [24, 24]\n  dim: 32\n")
    (tmp_path / "base" / "size.yaml").write_text("include: recipe.yaml\noptim:\n  lr: 2.0e-4\n")
    (tmp_path / "run.yaml").write_text("include: [base/size.yaml]\nmodel:\n  kind: gpt\n  grid: [16, 16]\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.weight_decay=0.2"])
    # the including file wins over its includes (lr), includes are relative to the file that names them, lists
    # are replaced (grid), untouched keys of every level survive (dim), overrides come last (weight_decay)
    assert cfg.optim.lr == 2e-4 and cfg.model.grid == (16, 16) and cfg.model.dim == 32
    assert cfg.optim.weight_decay == 0.2 and cfg.model.kind == "gpt"


def test_include_errors_name_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml' does not exist \(included by .*c\.yaml"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("include: {x: 1}\n")
    with pytest.raises(ConfigError, match="include must be a file name or a list"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("include: []\nmodel:\n  patch:\n    row_reset: maybe\n")
    with pytest.raises(ConfigError, match=r"model\.patch\.row_reset"):
        load_config(tmp_path / "e.yaml")


def test_epochs_become_steps_from_the_data_size():
    from dpar_scale.config import resolve_epochs, steps_for_epochs

    # ImageNet's 1,281,167 training images, 300 epochs at batch 256: rounded up, exactly (no float error)
    assert steps_for_epochs(300, 1_281_167, 256) == 1_501_368
    assert steps_for_epochs(1, 512, 256) == 2 and steps_for_epochs(1, 513, 256) == 3
    assert steps_for_epochs(0.5, 10, 3) == 2
    cfg = load_config(None, ["train.epochs=2", "data.batch_size=4", "train.steps=7"])
    line = resolve_epochs(cfg, 10)
    assert cfg.train.steps == 5 and "train.steps=5" in line and "10 training images" in line
    untouched = load_config(None, ["train.steps=7"])
    assert resolve_epochs(untouched, 10) is None and untouched.train.steps == 7
    with pytest.raises(ConfigError, match="train.epochs must be >= 0"):
        load_config(None, ["train.epochs=-1"])
    with pytest.raises(ConfigError, match="global_tokens_per_microbatch packs"):
        load_config(None, ["train.epochs=1", "data.global_tokens_per_microbatch=512"])
    with pytest.raises(ConfigError, match="needs training images"):
        steps_for_epochs(1, 0, 256)


@pytest.mark.parametrize("overrides, message", [
    (["model.conditioning=image"], r"model\.conditioning: 'image' is not one of class, text"),
    (["model.text.max_length=1"], r"model\.text\.max_length must be >= 2"),
    (["model.text.dropout=1.0"], r"model\.text\.dropout must be in \[0, 1\)"),
    (["model.conditioning=text", "model.text.vocab_size=64"], r"needs model\.text\.tokenizer"),
    (["model.conditioning=text", "model.text.tokenizer=t.model"], r"needs model\.text\.vocab_size"),
    (["model.conditioning=text", "model.kind=entropy", "model.text.tokenizer=t.model", "model.text.vocab_size=64"],
     "the entropy model is unconditional"),
])
def test_text_conditioning_values_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_text_config_defaults_and_saved_configs_without_it(tmp_path):
    cfg = load_config(None, ["model.conditioning=text", "model.kind=dpar", "model.text.tokenizer=t.model",
                             "model.text.vocab_size=1000", "data.captions_dir=/c"])
    assert (cfg.model.text.max_length, cfg.model.text.dropout) == (64, 0.1) and cfg.data.captions_dir == "/c"
    save_config(cfg, tmp_path / "config.yaml")
    assert to_dict(load_saved_config(tmp_path / "config.yaml")) == to_dict(cfg)
    # a run saved before text conditioning existed is class-conditional
    values = to_dict(load_config(None, ["model.preset=dpar-b"]))
    del values["model"]["conditioning"], values["model"]["text"], values["data"]["captions_dir"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(values))
    assert load_saved_config(tmp_path / "old.yaml").model.conditioning == "class"


def test_text_config_builds_text_models_and_refuses_what_cannot_be_one():
    from dpar_scale.models import build_model

    for preset in ("dpar-tiny", "gpt-tiny"):
        cfg = load_config(None, ["model.conditioning=text", f"model.preset={preset}", "model.text.tokenizer=t.model",
                                 "model.text.vocab_size=64"])
        model = build_model(cfg.model)
        assert model.text_embeddings.num_embeddings == 64 and not hasattr(model, "class_embedding")
    with pytest.raises(ConfigError, match="is a text-to-image model: set model.conditioning=text"):
        load_config(None, ["model.preset=dpar-tiny-text"])
    with pytest.raises(ConfigError, match="entropy model is unconditional"):
        load_config(None, ["model.conditioning=text", "model.kind=entropy", "model.preset=gpt-tiny",
                           "model.text.tokenizer=t.model", "model.text.vocab_size=64"])
