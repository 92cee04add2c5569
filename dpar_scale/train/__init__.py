"""Training: one trainer for every model kind (GPT baseline, entropy model, DPAR), and the engines it drives.

`trainer` (the loop), `trainer_setup` (what a run builds before its first step: processes, data, model, engine,
resume, run folder), `native_engine` (plain PyTorch: one process, FSDP2 / TP under torchrun), `deepspeed_engine`
(ZeRO 1-3), `metrics_log` (console line, metrics.jsonl, offline wandb), `numerics` (TF32,
train.deterministic), `stop_signals` (SIGTERM / USR2 -> checkpoint at the next step boundary), `batches` (a step's
micro-batches from the cursor: plan, then build), `prefetch` (built ahead by data.num_workers threads), `pending`
(losses and norms kept on the device until logged; the non-finite check), `loss` (chunked cross-entropy), `ema`.
Both engines offer
  forward_module            what the trainer calls for the forward pass
  autocast()                the precision context of the forward
  backward(loss, last)      backward of one micro-batch's (pre-scaled) loss (FSDP2: gradients reduced at `last`)
  step(check) -> norm       clip, `check(norm)` (None: the caller checks later), optimizer + LR step (DeepSpeed:
                            step, then check); the native engine's norm is a device tensor
  name, save_state(folder), load_state(folder)
May import: checkpoint, sampling, evaluation, flops, parallel, models, data, patching, config.
"""
