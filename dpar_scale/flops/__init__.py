"""FLOP accounting: the analytic count of a model's training FLOPs from its shape and real patch lengths, GPU peak
tables and MFU (`analytic`), the op-level counters (fvcore, FlopCounterMode) that cross-check it on the real
modules (`counting`), and the attention pairs they credit, recorded from the model's attention calls
(`attention_recording`).

May import: models, patching, config.
"""
