"""`rlhf-ray offline` end to end on the tiny model: DPO and IPO learn a preference from a file,
IQL and CQL learn a file's rewards, bad rows are skipped up to the limit and stop the run beyond
it, and a finished online run's buffer export trains every algorithm offline."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.data.prompts import DataError
from rlhf_ray.metrics import read_metrics
from rlhf_ray.offline_driver import train_offline

WORDS = ["apple", "river", "stone", "cloud", "lemon", "tiger", "piano", "candle", "forest",
         "pencil", "window", "garden"]


def _pairs_file(path, bad: int = 0):
    lines = []
    for i, a in enumerate(WORDS):
        for j, b in enumerate(WORDS):
            if i != j:
                lines.append(json.dumps({"prompt": f"Say {a} {b}", "chosen": " yes yes yes",
                                         "rejected": " no no no"}))
    for k in range(bad):
        lines.insert(3 + k, json.dumps({"prompt": "Say", "chosen": "", "rejected": " no"}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("algo", ["dpo", "ipo"])
def test_offline_learns_a_preference_from_a_file(ray_cluster, tmp_path, algo):
    data = _pairs_file(tmp_path / "pairs.jsonl", bad=1)
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", f"run.name={algo}", "run.steps=12",
        f"offline.algo={algo}", f"offline.data={data}", "offline.max_bad_rows=1",
        "offline.eval_every=6", "offline.eval_fraction=0.25", "learner.lr=5e-3",
        "offline.ipo_tau=0.5",
    ])
    run_dir = train_offline(cfg)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["eval/accuracy"] >= 0.95  # the held-out prompts were never trained on
    assert records[-1]["eval/policy_ll_accuracy"] >= 0.95
    assert records[-1]["eval/reward_margin"] > 0
    assert records[-1]["offline/loss"] < records[0]["offline/loss"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "skipped malformed row" in (run_dir / "train.log").read_text()

    from rlhf_ray.evaluation import evaluate

    result = evaluate(run_dir, limit=2, samples_per_prompt=1)
    assert set(result["models"]) == {"policy", "reference"}


def test_too_many_bad_rows_stop_the_run_before_it_starts(tmp_path, capsys):
    from rlhf_ray.cli import main

    data = _pairs_file(tmp_path / "pairs.jsonl", bad=2)
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", "run.name=r", f"offline.data={data}",
        "offline.max_bad_rows=1"])
    with pytest.raises(DataError, match=r"pairs.jsonl: 2 malformed preference rows"):
        train_offline(cfg)
    assert not (tmp_path / "r").exists()
    assert main(["offline", "--preset", "tiny", "--data", str(data), f"run.output_dir={tmp_path}",
                 "run.name=r"]) == 2
    assert "pairs.jsonl:4: field 'chosen'" in capsys.readouterr().err


def _scored_file(path):
    lines = []
    for i, a in enumerate(WORDS):
        for j, b in enumerate(WORDS):
            if i != j:
                for response, reward in ((" yes yes yes", 1.0), (" no no no", -1.0)):
                    lines.append(json.dumps({"prompt": f"Say {a} {b}", "response": response,
                                             "reward": reward}))
    lines.insert(5, json.dumps({"prompt": "Say", "response": " no", "reward": "bad"}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("algo", ["iql", "cql"])
def test_token_q_learning_from_scored_samples(ray_cluster, tmp_path, algo):
    data = _scored_file(tmp_path / "scored.jsonl")
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", f"run.name={algo}", "run.steps=30",
        f"offline.algo={algo}", f"offline.data={data}", "offline.max_bad_rows=1",
        "offline.eval_every=15", "offline.eval_fraction=0.25", "offline.eval_pairs=32",
        "learner.lr=5e-3", "offline.q_warmup_steps=2", "learner.batch_size=16"])
    run_dir = train_offline(cfg)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert [r["offline/policy_trained"] for r in records[:3]] == [0.0, 0.0, 1.0]
    last = records[-1]
    # held-out prompts: the heads rank responses as the reward does, and the policy has moved
    # its likelihood towards the rewarded one (the reference scores 0 on both)
    assert last["eval/advantage_reward_corr"] > 0.8
    assert last["eval/logratio_reward_corr"] > 0.8
    assert last["offline/q_loss"] < records[0]["offline/q_loss"]
    assert ("offline/cql_penalty" in last) == (algo == "cql")
    assert ("eval/cql_penalty" in last) == (algo == "cql")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    learner = run_dir / "checkpoints" / "step-00000030" / "learner"
    from safetensors.torch import load_file

    heads = load_file(str(learner / "q_heads.safetensors"))
    assert {"v.weight", "q.up.weight", "target_q.up.weight"} <= set(heads)
    assert "skipped malformed row" in (run_dir / "train.log").read_text()


def test_offline_training_from_an_online_runs_buffer_export(ray_cluster, tmp_path):
    from rlhf_ray.cli import main
    from rlhf_ray.driver import train

    online = train(load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", "run.name=online", "run.steps=3"]))
    export = tmp_path / "rows.parquet"
    assert main(["buffer", "export", str(online), str(export)]) == 0
    for algo in ("dpo", "iql", "cql"):
        cfg = load_config(preset="tiny", overrides=[
            f"run.output_dir={tmp_path}", f"run.name=offline-{algo}", "run.steps=3",
            f"offline.algo={algo}", f"offline.data={export}", "offline.eval_every=3"])
        run_dir = train_offline(cfg)
        records = read_metrics(run_dir)
        assert len(records) == 3
        key = "eval/accuracy" if algo == "dpo" else "eval/advantage_reward_corr"
        assert key in records[-1]
        log_text = (run_dir / "train.log").read_text()
        kind = "pairs" if algo == "dpo" else "samples"
        assert "training and" in log_text and f"held-out {kind}" in log_text


def test_data_that_tokenizes_to_nothing_stops_before_the_run_directory(tmp_path, capsys):
    from rlhf_ray.cli import main

    data = tmp_path / "special.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "response": "<|endoftext|>",
                                        "reward": 1.0}) + "\n" for w in WORDS * 3))
    args = ["offline", "--preset", "tiny", "--algo", "iql", "--data", str(data),
            f"run.output_dir={tmp_path}", "run.name=r"]
    assert main(args) == 2
    assert "an empty prompt or response once tokenized" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_held_out_reference_cache_is_keyed_by_position_not_by_uid():
    from rlhf_ray.data.scored import ScoredSample
    from rlhf_ray.learner.token_q import tokenize_samples
    from rlhf_ray.models.loading import load_tokenizer

    cfg = load_config(preset="tiny")
    samples = [ScoredSample("same", f"Say {w}", f" {w} yes", 1.0) for w in WORDS]
    kept, dropped = tokenize_samples(load_tokenizer(cfg.model), cfg, samples)
    assert dropped == 0 and [k[0] for k in kept] == list(range(len(WORDS)))


def test_resuming_a_run_whose_pretraining_failed_is_refused(tmp_path):
    import yaml

    from rlhf_ray.driver import RunStopped, Trainer

    cfg = load_config(preset="tiny", overrides=["offline.pretrain_steps=2"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    with pytest.raises(RunStopped, match="offline pre-training .* did not finish"):
        Trainer(cfg, run_dir, resume=True)
