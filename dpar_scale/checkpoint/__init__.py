"""Checkpoints: the on-disk format and its atomic save / load on any process layout (`save_load`), the checks
made before a resume loads anything (`resume_checks`), and one-file exports for sampling (`export`).

May import: parallel, models, data, patching, config.
"""
