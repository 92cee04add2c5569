"""Training engines: what differs between plain PyTorch (FSDP2 / TP under torchrun) and DeepSpeed.

The trainer's loop is the same for both; an engine provides
  forward_module            what the trainer calls for the forward pass
  autocast()                the precision context of the forward
  backward(loss, last)      backward of one micro-batch's (pre-scaled) loss
  step(check) -> norm       clip, `check(norm)`, optimizer + LR step (DeepSpeed: step, then check)
  lr, name, save(folder), load(folder)   (checkpoint part for multi-process runs)
"""
from dpar_scale.engines.native import NativeEngine

__all__ = ["NativeEngine"]
