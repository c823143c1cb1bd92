"""The tiny preset end to end on the session's real local Ray cluster."""

import json
import math

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


def test_tiny_run_with_replay_ratio_2_prioritized_and_durable_buffer(ray_cluster, tmp_path):
    """Rate-limited replay (2 samples per insert), prioritized: the run generates about half
    the on-policy samples per step, keeps the ratio, and leaves a readable on-disk buffer."""
    from rlhf_ray.cli import main
    from rlhf_ray.replay.storage import find_tables, read_shard

    steps, batch = 8, 8
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", "run.name=r", f"run.steps={steps}",
        "replay.samples_per_insert=2", "replay.max_times_sampled=2", "replay.max_staleness=2",
        "replay.sampler=prioritized",
    ])
    run_dir = train(cfg)
    records = read_metrics(run_dir)
    assert len(records) == steps
    generated = sum(r.get("rollout/samples", 0) for r in records)
    # on-policy would need steps * batch = 64; with ratio 2 about half, plus what was in flight
    assert batch * steps / 2 <= generated <= batch * steps / 2 + 3 * 8
    last = records[-1]
    assert 1.0 < last["replay/limiter_ratio"] <= 2.0
    # rows are drawn about twice each, not left to go stale (the look-ahead fits the staleness)
    assert last["replay/reuse_ratio"] >= 1.5
    assert all(0 < r["replay/effective_sample_size"] <= 1 for r in records)
    assert records[-1]["replay/priority_beta"] > records[0]["replay/priority_beta"]
    assert max(r["replay/batch_times_sampled_mean"] for r in records) > 1.0  # rows reused

    tables = find_tables(run_dir)
    assert list(tables) == ["online"]
    rows = sum(read_shard(d)[0].num_rows for d in tables["online"])
    # the requests in flight at the last step were finished for the final checkpoint
    account = json.loads((run_dir / "accounting.json").read_text())
    assert last["replay/size"] <= rows <= last["replay/size"] + 3 * 8
    assert account["samples"]["unaccounted"] == 0
    out = tmp_path / "rows.parquet"
    assert main(["buffer", "export", str(run_dir), str(out)]) == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == rows


def test_async_replay_ratio_4_keeps_generating_after_stale_evictions(ray_cluster, tmp_path):
    """Replay ratio 4 in the async loop: rows evicted as stale must not leave the driver
    believing the buffer is full (it would stop generating while the learner waits)."""
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", "run.name=r", "run.steps=8",
        "replay.samples_per_insert=4", "replay.max_times_sampled=4", "replay.max_staleness=3",
        "replay.sample_timeout_s=60",
    ])
    records = read_metrics(train(cfg))
    assert len(records) == 8
    assert records[-1]["replay/reuse_ratio"] > 1.0


def test_a_run_directory_that_is_not_empty_is_refused(tmp_path):
    from rlhf_ray.driver import make_run_dir

    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path}", "run.name=r"])
    (tmp_path / "r" / "replay").mkdir(parents=True)  # e.g. left by a run that failed at start
    with pytest.raises(FileExistsError, match="not empty"):
        make_run_dir(cfg)


def test_tiny_run_with_two_learners_and_two_generators(ray_cluster, tmp_path):
    """learner.num=2 (one gloo group, each drawing half the batch) beside 2 generators, on the
    test cluster's 4 CPUs; the run finishes, rank 0 publishes every step, and a checkpoint
    restores both ranks."""
    steps = 4
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", "run.name=dp", f"run.steps={steps}",
        "learner.num=2", "generator.num=2", "generator.num_cpus=0.5", "scorer.num_cpus=0.5",
        "learner.num_cpus=0.5", "run.checkpoint_every=2",
    ])
    run_dir = train(cfg)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["weights/version"] for r in records] == list(range(1, steps + 1))
    assert all(r["learner/rows"] == 4 for r in records)  # rank 0's half of 8
    assert all(math.isfinite(r["policy/loss"]) for r in records)
    final = run_dir / "checkpoints" / "step-00000004" / "learner"
    assert (final / "adapter_state.safetensors").is_file() and (final / "rank-1.json").is_file()
    account = json.loads((run_dir / "accounting.json").read_text())
    assert account["samples"]["unaccounted"] == 0
