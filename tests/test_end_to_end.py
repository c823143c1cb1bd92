"""The tiny preset end to end on the session's real local Ray cluster."""

import json

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.driver import train
from rlhf_ray.evaluation import evaluate
from rlhf_ray.metrics import GLOSSARY, read_metrics


@pytest.mark.parametrize("sync", [False, True])
def test_tiny_run_trains_publishes_and_saves_an_adapter(ray_cluster, tmp_path, sync):
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", "run.name=r", f"run.sync={str(sync).lower()}",
        "run.steps=5", "generator.num=2",
    ])
    run_dir = train(cfg)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    unknown = {k for r in records for k in r} - set(GLOSSARY)
    assert not unknown, f"metric keys missing from the glossary: {unknown}"
    last = records[-1]
    assert last["weights/version"] == 5
    assert last["weights/publish_failures"] == 0
    assert last["learner/rows"] == cfg.learner.batch_size
    assert all(r["learner/staleness_mean"] <= cfg.replay.max_staleness for r in records)
    assert sum(r.get("rollout/samples", 0) for r in records) >= 5 * cfg.learner.batch_size
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    from peft import PeftModel

    from rlhf_ray.models.loading import load_base_model

    model = PeftModel.from_pretrained(load_base_model(cfg.model), str(run_dir / "adapter"))
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().sum()) > 0 for p in lora)  # trained, not the zero init

    result = evaluate(run_dir, limit=4)
    assert set(result["models"]) == {"policy", "reference"}
    assert json.loads((run_dir / "eval.json").read_text())["held_out_prompts"] == 4
