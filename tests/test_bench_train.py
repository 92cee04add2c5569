"""tools/bench_train.py --demo measures the models `make demo` trains, not stand-ins."""
import json

from sampling_fixtures import REPO, load_tool

from dpar_scale.config import load_config
from dpar_scale.models import build_model, resolve_model_config


def test_demo_shapes_come_from_the_demo_configs(tmp_path):
    out = tmp_path / "bench.json"
    assert load_tool("bench_train").main(["--demo", "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    gpt_cfg = load_config(REPO / "configs/demo/gpt.yaml")
    assert result["batch"] == gpt_cfg.data.batch_size and result["grid"] == list(gpt_cfg.model.grid)
    for name in ("gpt", "dpar"):
        model = build_model(resolve_model_config(load_config(REPO / f"configs/demo/{name}.yaml").model))
        assert result["models"][name]["params"] == sum(p.numel() for p in model.parameters())
    # DPAR's global stack runs on the merged positions: fewer training FLOPs than the GPT of equal depth
    assert result["flop_ratio"] < 1.0
