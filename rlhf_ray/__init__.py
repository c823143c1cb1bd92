"""rlhf_ray: sample-efficient distributed RLHF on Ray (generators, scorers, replay, LoRA learners)."""
