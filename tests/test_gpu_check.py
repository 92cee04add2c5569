"""tools/gpu_check.py on the CPU (small shapes): every backend that can train here runs eager and compiled
(fullgraph: a graph break fails it), the backends and the two modes agree on the losses, backends that cannot
train here are listed with their reason, and the KV-cached samples run; the JSON holds what the table prints."""
import json

from sampling_fixtures import load_tool
from tolerances import abs_tol

gpu_check = load_tool("gpu_check")


def test_gpu_check_cpu_fallback(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--steps", "1", "--warmup", "1", "--samples", "2", "--layouts", "1",
                           "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    ran = {(r["model"], r["backend"], r["mode"]) for r in result["rows"]}
    assert ran == {(k, b, m) for k in ("dpar", "gpt") for b in ("auto", "sdpa") for m in ("eager", "compiled")}
    assert {(s["model"], s["backend"]) for s in result["skipped"]} == {
        (k, b) for k in ("dpar", "gpt") for b in ("flex", "varlen")}
    assert all(s["reason"] for s in result["skipped"])
    for r in result["rows"]:
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["loss"] < 20
        assert r["mfu"] is None and r["peak_memory_gb"] is None  # no peak or memory statistics on a CPU
    # same init, same batches, two steps: backends and modes differ only by float32 rounding; the chain is each
    # step's forward (4 layers + embeddings + the 16,384-way head) over both steps
    tol = abs_tol(max(r["loss"] for r in result["rows"]), reduction=16384, depth=2 * (4 + 2))
    assert set(result["max_loss_difference_between_backends"]) == {"dpar/eager", "dpar/compiled", "gpt/eager",
                                                                   "gpt/compiled"}
    for diffs in (result["max_loss_difference_between_backends"], result["max_loss_difference_eager_vs_compiled"]):
        assert all(v <= tol for v in diffs.values()), diffs
    assert set(result["sampling"]) == {"dpar", "gpt"} and all(s["seconds"] > 0 for s in result["sampling"].values())
    assert "DPAR / GPT step time, auto/eager" in printed and "skipped: flex_attention has no CPU backward" in printed
