#!/usr/bin/env python
"""The training path users run, checked on one device: bf16 training steps of DPAR and the GPT baseline with
every attention backend, eager and compiled, then a KV-cached sample.

  python tools/gpu_check.py [--json results/gpu_check.json]        # one CUDA device (H100/H200): < 5 min
  python tools/gpu_check.py --device cpu                           # small shapes, fp32: what the test suite runs

CUDA: dpar-b and gpt-b at 256 px (16x16 codes) with the LlamaGen vocabulary (16,384) and 1,000 classes, bf16
autocast, fused AdamW, batch 64; DPAR's layouts from synthetic entropies calibrated to mean patch length 1.81
(P_max 4), its packed length padded to 128 (parallel.compile_bucket). CPU: the same code at width 64, 8x8 codes,
fp32; compiled with dynamo's eager backend (graph capture, fullgraph: a graph break fails the check), since
inductor's code generation takes minutes on a small CPU.

Per (model, backend, mode) a row: median step time, tokens (codes) / s, MFU (analytic training FLOPs over the
device's dense bf16 peak, CUDA only), peak memory (CUDA only), final loss; then per model and mode the max
|loss difference| between backends over all steps (same init, same batches). A backend that cannot train here is
listed with the reason (flex has no CPU backward in torch 2.13; varlen needs CUDA). Then a 16-image KV-cached
sample of each model (DPAR with a static layout of mean length 1.81: no entropy model needed), timed.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpar_scale.cli import (  # noqa: E402
    UsageError, entry_point, non_negative_int, parser, positive_int, write_json_report,
)

BACKENDS = ("auto", "sdpa", "flex", "varlen")
SHAPES = {  # device type -> model shape and batch
    "cuda": dict(dpar="dpar-b", gpt="gpt-b", dim=0, heads=0, grid=16, vocab=16384, classes=1000, batch=64),
    "cpu": dict(dpar="dpar-tiny", gpt="gpt-tiny", dim=64, heads=2, grid=8, vocab=16384, classes=10, batch=4),
}


def _cfg(preset: str, shape: dict, backend: str):
    from dpar_scale.config import load_config
    from dpar_scale.models import resolve_model_config

    overrides = [f"model.preset={preset}", f"model.vocab_size={shape['vocab']}",
                 f"model.num_classes={shape['classes']}", f"model.grid=[{shape['grid']},{shape['grid']}]",
                 "model.dropout=0.0", "model.class_dropout=0.0", f"model.attention_backend={backend}"]
    overrides += [f"model.dim={shape['dim']}"] if shape["dim"] else []
    overrides += [f"model.n_heads={shape['heads']}"] if shape["heads"] else []
    return resolve_model_config(load_config(None, overrides).model)


def _unavailable(backend: str, device) -> str:
    """Why `backend` cannot train on `device` ("" if it can)."""
    from dpar_scale.models.packed_attention import varlen_available

    if backend == "flex" and device.type != "cuda":
        return "flex_attention has no CPU backward in torch 2.13"
    if backend == "varlen":
        ok, why = varlen_available()
        return "" if ok and device.type == "cuda" else (why or "needs a CUDA device")
    return ""


def train_run(cfg, batches, device, *, steps: int, warmup: int, compiled: bool, compile_backend: str, seed: int):
    """Per step: (loss, seconds); plus the peak memory (bytes, CUDA) of the run."""
    import torch

    from dpar_scale.models import build_model, compile_flex
    from dpar_scale.parallel.parallelize import apply_compile
    from dpar_scale.train.loss import code_loss

    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    with torch.no_grad():
        model.output.weight.normal_(std=0.02)  # the LlamaGen init zeroes the head: every backend's loss would tie
    if cfg.attention_backend == "flex" and device.type == "cuda":
        compile_flex()  # eager flex materialises the scores: the fused kernel is what anyone would train with
    if compiled:
        # each run compiles from scratch, as a training process does: the blocks of every model and backend share
        # code objects, whose cache entries would otherwise pile up past dynamo's recompile limit
        torch._dynamo.reset()
        apply_compile(model, backend=compile_backend, fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    half = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = []
    for i in range(warmup + steps):
        codes, labels, layout = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
            logits = model(codes, labels, layout if cfg.kind == "dpar" else None)
        loss = code_loss(logits, codes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())  # the one sync per step: the timing needs the step finished anyway
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((value, time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return out[warmup:], out, peak, model


def sample_run(model, kind: str, device, n: int, grid: int, seed: int) -> float:
    """Seconds for a KV-cached sample of `n` images (CFG 2.0)."""
    import torch

    from dpar_scale.config import PatchConfig
    from dpar_scale.sampling.generate import generate_dpar, generate_gpt

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, model.num_classes, (n,), generator=g)
    uniforms = torch.rand(n, grid * grid, generator=g)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if kind == "dpar":
            generate_dpar(model, None, labels, patch_cfg=PatchConfig(mode="static", static_length=1.81),
                          uniforms=uniforms, cfg_scale=2.0)
        else:
            generate_gpt(model, labels, uniforms=uniforms, cfg_scale=2.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--device", default="cuda", help="cuda (one device: the current one) or cpu (small shapes)")
    p.add_argument("--steps", type=positive_int, default=0, help="timed steps per run (default cuda 8, cpu 2)")
    p.add_argument("--warmup", type=non_negative_int, default=0, help="untimed first steps (default cuda 3, cpu 1)")
    p.add_argument("--batch", type=non_negative_int, default=0, help="images per step (0 = the device default)")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--layouts", type=positive_int, default=2, help="DPAR layouts the steps cycle through (each new "
                   "shape bucket costs a compiled run a recompile)")
    p.add_argument("--samples", type=non_negative_int, default=16, help="images of the KV-cached sample (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    if set(backends) - set(BACKENDS) or not backends:
        raise UsageError(f"--backends {args.backends!r}: each must be one of {', '.join(BACKENDS)}")
    if set(modes) - {"eager", "compiled"} or not modes:
        raise UsageError(f"--modes {args.modes!r}: each must be eager or compiled")
    import torch

    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        raise UsageError(f"--device {args.device!r} must be cuda, cuda:N or cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here (run on a GPU node, or --device cpu for "
                         "the small-shape check)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    from dpar_scale.flops.analytic import peak_flops, train_flops
    from dpar_scale.patching.layout import PatchLayout
    from dpar_scale.patching.rule import synthetic_patch_lengths

    shape = dict(SHAPES[device.type])
    shape["batch"] = args.batch or shape["batch"]
    steps = args.steps or (8 if device.type == "cuda" else 2)
    warmup = args.warmup if args.warmup or args.steps else (3 if device.type == "cuda" else 1)
    compile_backend = "inductor" if device.type == "cuda" else "eager"
    n_codes, b = shape["grid"] ** 2, shape["batch"]
    g = torch.Generator().manual_seed(args.seed)
    batches = []
    for i in range(args.layouts):  # layouts in turn: a compiled run meets more than one shape
        lengths = synthetic_patch_lengths(b, shape["grid"], vocab=shape["vocab"], seed=args.seed + i)
        batches.append((torch.randint(0, shape["vocab"], (b, n_codes), generator=g).to(device),
                        torch.randint(0, shape["classes"], (b,), generator=g).to(device),
                        PatchLayout.from_lengths(lengths, (shape["grid"],) * 2, pad_to_multiple=128).to(device)))
    peak = peak_flops(device, precision="bf16")
    rows, skipped, losses, models = [], [], {}, {}
    started = time.perf_counter()
    for kind in ("dpar", "gpt"):
        for mode in modes:
            for backend in backends:
                why = _unavailable(backend, device)
                if why:
                    skipped.append({"model": kind, "backend": backend, "mode": mode, "reason": why})
                    continue
                cfg = _cfg(shape[kind], shape, backend)
                timed, every, mem, model = train_run(cfg, batches, device, steps=steps, warmup=warmup,
                                                     compiled=mode == "compiled", compile_backend=compile_backend,
                                                     seed=args.seed)
                seconds = statistics.median(t for _, t in timed)
                flops = statistics.mean(
                    train_flops(cfg, batch_images=b, patch_lengths=batches[i % len(batches)][2].lengths if kind == "dpar"
                                else None) for i in range(warmup, warmup + steps))
                row = {"model": kind, "preset": cfg.preset, "backend": backend, "mode": mode,
                       "step_time_s": seconds, "tokens_per_s": b * n_codes / seconds,
                       "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None,
                       "peak_memory_gb": mem / 2 ** 30 if mem is not None else None, "loss": timed[-1][0],
                       "first_step_s": every[0][1]}
                rows.append(row)
                losses[(kind, mode, backend)] = [x for x, _ in every]
                models.setdefault(kind, model)
                print(f"  {kind} {backend} {mode}: {seconds:.3f} s/step ({time.perf_counter() - started:.0f} s)",
                      flush=True)
    spread = {}
    for kind in ("dpar", "gpt"):
        for mode in modes:
            runs = [v for (k, m, _), v in losses.items() if k == kind and m == mode]
            if len(runs) > 1:
                spread[f"{kind}/{mode}"] = max(abs(a - c) for run in runs for a, c in zip(run, runs[0]))
    eager_vs_compiled = {}
    for (kind, mode, backend), run in losses.items():
        if mode == "compiled" and (kind, "eager", backend) in losses:
            ref = losses[(kind, "eager", backend)]
            eager_vs_compiled[f"{kind}/{backend}"] = max(abs(a - c) for a, c in zip(run, ref))
    sampling = {}
    if args.samples:
        for kind, model in models.items():
            seconds = sample_run(model, kind, device, args.samples, shape["grid"], args.seed)
            sampling[kind] = {"images": args.samples, "seconds": seconds, "images_per_s": args.samples / seconds}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, batch {b} x {n_codes} codes, vocab {shape['vocab']}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, median of {steps} steps after {warmup}")
    print(f"{'model':<5} {'backend':<7} {'mode':<9} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GB':>8} {'loss':>8}")
    for r in rows:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        print(f"{r['model']:<5} {r['backend']:<7} {r['mode']:<9} {r['step_time_s']:>8.4f} {r['tokens_per_s']:>10.0f} "
              f"{r['tflops']:>8.2f} {mfu:>6} {mem:>8} {r['loss']:>8.4f}")
    for s in skipped:
        print(f"{s['model']:<5} {s['backend']:<7} {s['mode']:<9} skipped: {s['reason']}")
    for key, value in spread.items():
        print(f"max |loss difference| between backends, {key}: {value:.3g}")
    for key, value in eager_vs_compiled.items():
        print(f"max |loss difference| eager vs compiled, {key}: {value:.3g}")
    by = {(r["model"], r["backend"], r["mode"]): r for r in rows}
    ratios = {}
    for mode in modes:
        for backend in backends:
            if ("dpar", backend, mode) in by and ("gpt", backend, mode) in by:
                ratios[f"{backend}/{mode}"] = (by[("dpar", backend, mode)]["step_time_s"]
                                               / by[("gpt", backend, mode)]["step_time_s"])
    for key, value in ratios.items():
        print(f"DPAR / GPT step time, {key}: {value:.3f}")
    for kind, s in sampling.items():
        print(f"sample {kind}: {s['images']} images (KV cache, CFG 2.0) in {s['seconds']:.2f} s")
    print(f"total {time.perf_counter() - started:.0f} s")
    result = {"device": name, "torch": torch.__version__, "batch": b, "codes_per_image": n_codes,
              "vocab": shape["vocab"], "steps": steps, "warmup": warmup, "peak_flops": peak, "rows": rows,
              "skipped": skipped, "max_loss_difference_between_backends": spread,
              "max_loss_difference_eager_vs_compiled": eager_vs_compiled, "dpar_gpt_step_time_ratio": ratios,
              "sampling": sampling, "seconds": time.perf_counter() - started}
    write_json_report(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
