"""Config loading, overrides and validation errors that name the key."""

import pytest

from rlhf_ray.config import Config, ConfigError, load_config, preset_names


def test_defaults_and_presets_validate():
    assert {"default", "tiny"} <= set(preset_names())
    assert load_config().model.name == "smollm2-135m-instruct"
    tiny = load_config(preset="tiny")
    assert tiny.model.name == "tiny-llama" and tiny.run.steps == 4


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("learner:\n  lr: 3.0e-4\ngenerator:\n  n_samples: 8\n")
    cfg = load_config(preset="tiny", files=[str(f)], overrides=["learner.lr=1e-4"])
    assert cfg.learner.lr == 1e-4 and cfg.generator.n_samples == 8
    assert isinstance(cfg, Config)


def test_unknown_key_in_a_file_names_file_line_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("learner:\n  lr: 1e-4\n  bogus_field: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: key 'learner.bogus_field'"):
        load_config(files=[str(f)])


def test_wrong_type_and_bad_override_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="learner.batch_size"):
        load_config(overrides=["learner.batch_size=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["learner.lr"])
    f = tmp_path / "broken.yaml"
    f.write_text("learner: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml:.*invalid YAML"):
        load_config(files=[str(f)])


@pytest.mark.parametrize("override, key", [
    ("generator.top_p=0.9", "generator.top_p"),
    ("generator.top_k=50", "generator.top_k"),
    ("generator.n_samples=1", "generator.n_samples"),
    ("algorithm.advantage=ppo2", "algorithm.advantage"),
    ("learner.batch_size=30", "learner.num_minibatches"),
    ("generator.temperature=0", "generator.temperature"),
    ("algorithm.clip_eps=1.5", "algorithm.clip_eps"),
    ("replay.capacity=2", "replay.capacity"),
    ("replay.priority_alpha=1000", "replay.priority_alpha"),
    ("replay.sampler=foo", "replay.sampler"),
    ("replay.offline_fraction=0.5", "replay.offline_fraction"),
])
def test_impossible_combinations_are_rejected(override, key):
    extra = ["learner.num_minibatches=4"] if key == "learner.num_minibatches" else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(preset="tiny", overrides=[override, *extra])


@pytest.mark.parametrize("override, message", [
    ("scorer.reward=no_such_module_xyz:f", "cannot import"),
    ("scorer.reward=sentiment", "not a builtin"),
    ("scorer.reward=model:/nonexistent", "no reward-model folder"),
    ("model.name=/nonexistent/model", "no such folder"),
    ("model.adapter_path=/nonexistent", "adapter_config.json"),
])
def test_preflight_rejects_bad_paths_and_rewards_before_ray_starts(override, message):
    from rlhf_ray.config import preflight

    with pytest.raises(ConfigError, match=message):
        preflight(load_config(preset="tiny", overrides=[override]))


@pytest.mark.parametrize("override", ["learner.lr=nan", "generator.temperature=inf",
                                      "learner.warmup_steps=-3", "model.lora_dropout=2",
                                      "run.name=../escape", "generator.top_p=1.5"])
def test_non_finite_and_out_of_range_values_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(preset="tiny", overrides=[override])


def test_cli_accepts_overrides_after_flags_and_reports_errors_without_traceback(capsys):
    from rlhf_ray.cli import main

    assert main(["train", "--preset", "tiny", "--sync", "generator.top_p=0.5"]) == 2
    assert "generator.top_p=0.5" in capsys.readouterr().err


def test_a_key_given_twice_in_a_yaml_file_is_an_error_with_its_line(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("learner:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:3: invalid YAML: .*'lr' is given twice"):
        load_config(files=[str(f)])


@pytest.mark.parametrize("overrides, message", [
    # a row is drawn at most once a step: 4 uses need 3 versions of staleness
    (["replay.samples_per_insert=4", "replay.max_times_sampled=4"], r"replay\.max_staleness >= 3"),
    (["replay.samples_per_insert=2"], r"replay\.max_times_sampled=1 < replay\.samples_per_insert"),
    (["replay.samples_per_insert=1", "replay.error_buffer=inf"], r"replay\.error_buffer=inf"),
    (["replay.samples_per_insert=1", "replay.error_buffer=1"], r"replay\.error_buffer=1: must"),
    (["replay.samples_per_insert=1", "replay.num_shards=100"], r"error_buffer=16 \(the default"),
    (["replay.samples_per_insert=1", "replay.min_size_to_sample=100000"],
     r"replay\.min_size_to_sample=100000 exceeds"),
])
def test_rate_limit_settings_that_could_never_run_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset="tiny", overrides=overrides)


def test_offline_files_are_read_in_preflight(tmp_path):
    from rlhf_ray.config import preflight
    from rlhf_ray.data.prompts import DataError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    big = tmp_path / "big.JSONL"  # the suffix is matched in any case
    big.write_text('{"prompt": "p", "response": "r", "reward": 1' + "0" * 400 + "}\n")
    for path, message in ((empty, "holds no rows"), (big, r"big\.JSONL:1: .*too large")):
        cfg = load_config(preset="tiny", overrides=[f"replay.offline_files=[{path}]"])
        with pytest.raises(DataError, match=message):
            preflight(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["offline.awr_beta=.inf"], r"offline.awr_beta=inf: .*behaviour cloning"),
    (["offline.awr_max_weight=0.5"], r"offline.awr_max_weight=0.5: must be finite and >= 1"),
    (["offline.tau_expectile=1.0"], r"offline.tau_expectile=1.0: must be in \(0, 1\)"),
    (["offline.polyak_tau=0"], r"offline.polyak_tau=0.0: must be in \(0, 1\]"),
    (["offline.cql_alpha=-1"], r"offline.cql_alpha=-1.0: must be finite and >= 0"),
    (["offline.gamma=1.5"], r"offline.gamma=1.5: must be in \[0, 1\]"),
    (["offline.q_warmup_steps=5", "run.steps=5"], r"offline.q_warmup_steps=5: must be below"),
    (["offline.q_warmup_steps=3", "run.steps=2", "offline.pretrain_steps=5"],
     r"offline.q_warmup_steps=3: must be below run.steps=2"),
    (["offline.q_warmup_steps=3", "run.steps=9", "offline.pretrain_steps=3"],
     r"offline.q_warmup_steps=3: must be below offline.pretrain_steps=3"),
    (["offline.q_rank=-1"], r"offline.q_rank=-1: must be >= 0"),
])
def test_iql_and_cql_settings_that_cannot_learn_are_rejected(overrides, message):
    for algo in ("iql", "cql"):
        with pytest.raises(ConfigError, match=message):
            load_config(preset="tiny", overrides=[f"offline.algo={algo}", *overrides])
    # the same values do not concern dpo
    if overrides != ["offline.q_rank=-1"]:
        load_config(preset="tiny", overrides=["offline.algo=dpo", *overrides])


def test_offline_data_defaults_to_the_builtin_set_of_the_algorithm():
    from rlhf_ray.config import offline_data
    from rlhf_ray.offline_driver import load_data

    assert offline_data(load_config(preset="tiny")) == "movie-review-preferences"
    cfg = load_config(preset="tiny", overrides=["offline.algo=cql"])
    assert offline_data(cfg) == "movie-review-samples"
    cfg = load_config(preset="tiny", overrides=["offline.algo=iql",
                                                "offline.data=movie-review-preferences"])
    with pytest.raises(ConfigError, match="learns from scored samples"):
        load_data(cfg)
