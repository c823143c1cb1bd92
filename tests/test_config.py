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
