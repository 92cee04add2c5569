"""Checkpoints: the on-disk format and its atomic save / load on any process layout (`save_load`), the checks
made before a resume loads anything (`resume_checks`), one-file exports for sampling (`export`), LlamaGen
checkpoints imported as exports (`llamagen`), and everything sampling a checkpoint needs: model, tokenizer,
entropy model, patch rule (`sampling_inputs`).

May import: parallel, models, data, tokenizer, patching, config.
"""
