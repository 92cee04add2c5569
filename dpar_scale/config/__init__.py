"""Typed run configuration: nested dataclasses, loaded from YAML, overridden with dotted `key=value` pairs.

Every entry point (train.py, the tools, the launchers) builds a `Config` the same way:
`load_config(path, overrides)`. Unknown keys and values of the wrong type are rejected with the dotted key in
the message, so a typo in a 48-hour Slurm job fails in the first second instead of being silently ignored.

A YAML file may start from others: `include: base.yaml` (or a list, paths relative to the including file) reads
those first, in order, and the file's own keys then override theirs (mappings merge key by key; lists and scalars
are replaced). Dotted overrides apply last. `configs/paper/` is built this way: one recipe, one file per
resolution, one small file per run.

The package: `sections` (the dataclasses), `loading` (files, overrides, saved configs), `validation`
(value checks). Everything is importable from `dpar_scale.config`."""
from dpar_scale.config.loading import (
    INCLUDE_KEY, apply_overrides, load_config, load_saved_config, override, read_config_file, save_config, to_dict,
    with_legacy_sections,
)
from dpar_scale.config.sections import (
    CONDITIONINGS, DECODER_INJECTIONS, LEGACY_DPAR, PATCH_ALIGNMENTS, PATCH_MODES, CheckpointConfig, Config,
    ConfigError, DataConfig, DPARConfig, EvalConfig, ModelConfig, OptimConfig, ParallelConfig, PatchConfig,
    RunConfig, SampleConfig, TextConfig, TrainConfig, WandbConfig,
)
from dpar_scale.config.validation import (
    parse_dpar_structure, resolve_epochs, steps_for_epochs, validate, validate_eval, validate_patch,
)

__all__ = [
    "INCLUDE_KEY",
    "apply_overrides",
    "load_config",
    "load_saved_config",
    "override",
    "read_config_file",
    "save_config",
    "to_dict",
    "with_legacy_sections",
    "CONDITIONINGS",
    "DECODER_INJECTIONS",
    "LEGACY_DPAR",
    "PATCH_ALIGNMENTS",
    "PATCH_MODES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DPARConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PatchConfig",
    "RunConfig",
    "SampleConfig",
    "TextConfig",
    "TrainConfig",
    "WandbConfig",
    "parse_dpar_structure",
    "resolve_epochs",
    "steps_for_epochs",
    "validate",
    "validate_eval",
    "validate_patch",
]
