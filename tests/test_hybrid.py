"""The two hybrid presets on the tiny model: offline rows from a builtin set mixed into online
batches (`hybrid-mix`), and offline pre-training followed by online training from its adapter
(`hybrid-pretrain`); and the preset `base:` chain they rely on."""

from __future__ import annotations

import pytest
import yaml

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.metrics import read_metrics

# the tiny model and prompts under the hybrid presets (which build on the default task)
TINY = ["model.name=tiny-llama", "model.lora_rank=4", "model.lora_alpha=8",
        "generator.prompts_per_request=4", "generator.n_samples=2",
        "generator.max_new_tokens=8", "learner.batch_size=8", "learner.micro_batch_size=4",
        "learner.lr=1e-3", "run.tensorboard=false", "run.progress=false", "run.plots=false",
        "run.sync=true", "replay.capacity=256"]


def test_hybrid_presets_build_on_the_default_task():
    default = load_config(preset="default")
    mix = load_config(preset="hybrid-mix")
    pre = load_config(preset="hybrid-pretrain")
    for cfg in (mix, pre):
        assert cfg.model == default.model and cfg.algorithm == default.algorithm
        assert cfg.generator == default.generator and cfg.run.steps == default.run.steps
    assert mix.replay.offline_files == ["movie-review-samples"]
    assert mix.replay.offline_fraction == 0.25
    assert pre.offline.pretrain_steps == 12 and pre.offline.algo == "dpo"


def test_a_preset_base_chain_that_loops_is_an_error(tmp_path, monkeypatch):
    import rlhf_ray.config as config

    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    monkeypatch.setattr(config, "_preset_path", lambda name: tmp_path / f"{name}.yaml")
    with pytest.raises(ConfigError,
                       match=r"b.yaml: base: 'a' makes the presets loop \(a -> b -> a\)"):
        load_config(preset="a")


def test_hybrid_mix_draws_builtin_offline_rows_into_online_batches(ray_cluster, tmp_path):
    from rlhf_ray.driver import train

    cfg = load_config(preset="hybrid-mix", overrides=[
        *TINY, f"run.output_dir={tmp_path}", "run.name=mix", "run.steps=2"])
    run_dir = train(cfg)
    records = read_metrics(run_dir)
    assert [r["replay/offline_rows"] for r in records] == [2, 2]  # a quarter of 8
    assert all(r["learner/rows"] == 8 for r in records)
    # the training side only: no held-out movie-review prompt is in the offline table
    from rlhf_ray.data.prompts import movie_review_openings, split_prompts
    from rlhf_ray.replay.offline import builtin_records

    records = builtin_records(cfg, "movie-review-samples")
    _, held = split_prompts(movie_review_openings(4), 0.2)
    assert records and not {r["prompt"] for r in records} & {h.text for h in held}


def test_hybrid_pretrain_trains_offline_then_online_from_that_adapter(ray_cluster, tmp_path):
    from safetensors.torch import load_file

    from rlhf_ray.driver import train

    cfg = load_config(preset="hybrid-pretrain", overrides=[
        *TINY, f"run.output_dir={tmp_path}", "run.name=pre", "run.steps=2",
        "offline.pretrain_steps=3", "offline.eval_every=3", "offline.eval_pairs=8",
        "offline.rejected_per_prompt=1", "offline.max_response_tokens=8"])
    run_dir = train(cfg)
    pretrain = run_dir / "pretrain"
    assert [r["step"] for r in read_metrics(pretrain)] == [1, 2, 3]
    assert "eval/accuracy" in read_metrics(pretrain)[-1]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["adapter_path"] == str(pretrain / "adapter")
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    # the online run started from the pre-trained adapter and moved on from it
    start = load_file(str(pretrain / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert start.keys() == final.keys()
    assert any(float((final[k] - start[k]).abs().max()) > 0 for k in start)
    lora_b = [k for k in start if "lora_B" in k]
    assert any(float(start[k].abs().max()) > 0 for k in lora_b)  # not a fresh adapter (B = 0)
    assert "offline pre-training: 3 dpo steps" in (run_dir / "train.log").read_text()
