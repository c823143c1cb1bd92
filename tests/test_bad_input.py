"""Bad input that is not a data file: a config that asks for more than the cluster has is an
error before any actor starts; a tokenizer without a pad token still works, one with neither
pad nor EOS is an error naming the model."""

from __future__ import annotations

import pytest

from rlhf_ray.config import ModelConfig, load_config
from rlhf_ray.driver import Trainer, check_resources


@pytest.mark.parametrize("overrides, message", [
    (["learner.num_cpus=64"], r"learner.num_cpus=64.0 but the cluster has 4 CPU"),
    (["generator.num_gpus=1"], r"generator.num_gpus=1.0 but the cluster has 0 GPU"),
    (["generator.resources={generator_node: 1}"],
     r"generator.resources.generator_node=1.0 but the cluster has 0 generator_node"),
    (["learner.label_selector={zone: moon}"],
     r"learner.label_selector=\{'zone': 'moon'\}: no node of the cluster has these labels"),
    (["generator.num=3", "generator.num_cpus=2"],
     r"asks for 8 CPU \(generator: 3 x 2, scorer: 1 x 1, learner: 1 x 1\) but the cluster "
     r"has 4"),
])
def test_more_resources_than_the_cluster_has_is_an_error_naming_the_role(ray_cluster, overrides,
                                                                         message):
    cfg = load_config(preset="tiny", overrides=overrides)
    with pytest.raises(RuntimeError, match=message):
        check_resources(cfg)


def test_a_run_asking_too_much_stops_before_starting_an_actor(ray_cluster, tmp_path):
    import ray

    before = len(ray.util.list_named_actors(all_namespaces=True)) if hasattr(
        ray.util, "list_named_actors") else None
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path}", "run.name=big",
                                                "learner.num_gpus=2"])
    trainer = Trainer(cfg)
    with pytest.raises(RuntimeError, match="learner.num_gpus=2.0 but the cluster has 0 GPU"):
        trainer.run()
    assert trainer.system is None  # no actor was started
    assert not (tmp_path / "big" / "replay").exists()
    if before is not None:
        assert len(ray.util.list_named_actors(all_namespaces=True)) == before


def test_a_tokenizer_without_pad_token_pads_with_eos_and_one_without_either_is_an_error(
        tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from rlhf_ray.models.builtin import resolve_model_path
    from rlhf_ray.models.loading import load_tokenizer

    source = resolve_model_path("tiny-gpt2")
    raw = AutoTokenizer.from_pretrained(source)

    def model_folder(name: str, **unset) -> str:
        for key in unset:
            setattr(raw, key, None)
        folder = tmp_path / name
        raw.save_pretrained(folder)
        AutoConfig.from_pretrained(source).save_pretrained(folder)
        return str(folder)

    no_pad = model_folder("no-pad", pad_token=None)
    assert AutoTokenizer.from_pretrained(no_pad).pad_token_id is None
    tok = load_tokenizer(ModelConfig(name=no_pad))
    assert tok.pad_token_id == tok.eos_token_id is not None
    batch = tok(["a", "a longer text"], padding=True)
    assert len(set(map(len, batch["input_ids"]))) == 1

    neither = model_folder("neither", eos_token=None)
    with pytest.raises(ValueError, match="has neither a pad nor an EOS token"):
        load_tokenizer(ModelConfig(name=neither))
