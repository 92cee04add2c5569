"""Sampling: class-conditional generation with classifier-free guidance and KV caches for the GPT baseline and
DPAR (whose entropy model runs alongside and decides patch boundaries on the fly).

May import: models, patching, config.
"""
