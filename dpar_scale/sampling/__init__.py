"""Sampling: class-conditional generation with classifier-free guidance and KV caches for the GPT baseline and
DPAR (whose entropy model runs alongside and decides patch boundaries on the fly) (`generate`); per-sample
random streams and labels as pure functions of the seed (`streams`); codes to uint8 images (`images`); the
sampling tools' shared options (`options`); chunked, resumable, world-size-independent generation of a whole
evaluation set (`chunked`, `chunk_files`).

May import: parallel, models, patching, config.
"""
