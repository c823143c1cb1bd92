"""`rlhf-ray eval RUN_DIR`: the trained adapter against the reference on held-out prompts.

Both models sample the same held-out prompts with the run's sampling settings (temperature;
top-p/top-k may be set here, unlike in training). Reported per model: mean reward with a 95%
t-interval, KL to the reference (mean over responses of sum_t log pi - log ref, on the policy's
own samples, so an unbiased estimate of the sequence KL), distinct-1/2 (unique word n-grams over
all n-grams, across all responses) and the share of the most repeated response. A policy that
games the reward by collapsing into a stock sentence is flagged: distinct-2 below 80% of the
reference's, or one response making up more than 10% of all responses (and twice the reference's
share).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from rlhf_ray.config import Config, config_from_dict


def distinct_n(texts: list[str], n: int) -> float:
    grams, total = set(), 0
    for t in texts:
        words = t.split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i : i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def top_share(texts: list[str]) -> float:
    if not texts:
        return 0.0
    return Counter(t.strip().lower() for t in texts).most_common(1)[0][1] / len(texts)


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t-interval."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("inf")
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


@dataclass
class ModelReport:
    name: str
    reward_mean: float
    reward_ci: float
    kl_mean: float
    kl_ci: float
    distinct_1: float
    distinct_2: float
    top_share: float
    responses: list[str]

    def row(self) -> str:
        return (f"{self.name:<10} {self.reward_mean:+.3f} ± {self.reward_ci:.3f}   "
                f"{self.kl_mean:7.3f} ± {self.kl_ci:.3f}   {self.distinct_1:6.3f} "
                f"{self.distinct_2:6.3f}   {self.top_share:6.3f}")


def evaluate(run_dir: str | Path, *, samples_per_prompt: int | None = None,
             temperature: float | None = None, top_p: float = 1.0, top_k: int = 0,
             limit: int | None = None, seed: int = 1234, threads: int = 2) -> dict:
    from rlhf_ray.data.prompts import load_prompts, split_prompts
    from rlhf_ray.generation.backend import SamplingParams
    from rlhf_ray.generation.generator import stop_token_ids
    from rlhf_ray.generation.hf_backend import HFBackend
    from rlhf_ray.models.forward import batched_logprobs
    from rlhf_ray.models.loading import load_base_model, load_tokenizer
    from rlhf_ray.scoring.rewards import make_reward

    for name, value, ok in [("--samples", samples_per_prompt, lambda v: v >= 1),
                            ("--temperature", temperature, lambda v: 0 < v < float("inf")),
                            ("--limit", limit, lambda v: v >= 1)]:
        if value is not None and not ok(value):
            raise ValueError(f"{name}={value}: out of range")
    if not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"--top-p={top_p} must be in (0, 1] and --top-k={top_k} >= 0")
    torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a training run directory?")
    cfg: Config = config_from_dict(yaml.safe_load(cfg_path.read_text()))
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter (did the run finish?)")
    from peft import PeftModel

    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model)
    stops = stop_token_ids(tokenizer, base)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval().requires_grad_(False)
    _, held_out = split_prompts(load_prompts(cfg.data), cfg.data.eval_fraction)
    held_out = held_out[:limit] if limit is not None else held_out
    n = cfg.run.eval_samples_per_prompt if samples_per_prompt is None else samples_per_prompt
    temp = cfg.generator.temperature if temperature is None else temperature
    params = SamplingParams(cfg.generator.max_new_tokens, temp, top_p, top_k)
    prompt_ids = []
    for r in held_out:
        ids = tokenizer(r.text)["input_ids"][-cfg.data.max_prompt_tokens :]
        prompt_ids.append(ids or [tokenizer.eos_token_id])
    kind, reward = make_reward(cfg.scorer.reward, trust_remote_code=cfg.model.trust_remote_code)
    backend = HFBackend(model, tokenizer, stops)
    reports, per_model = [], {}
    for name in ("policy", "reference"):
        completions = []
        for start in range(0, len(prompt_ids), 8):
            chunk = prompt_ids[start : start + 8]
            if name == "reference":
                with model.disable_adapter():
                    out = backend.generate(chunk, n, params, seed + start)
            else:
                out = backend.generate(chunk, n, params, seed + start)
            completions.extend(out)
        prompts_rep = [p for p, cs in zip(prompt_ids, completions) for _ in cs]
        prompt_text = [r.text for r, cs in zip(held_out, completions) for _ in cs]
        responses = [c.response_ids for cs in completions for c in cs]
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        if kind == "model":
            rewards = reward.score_texts(prompt_text, texts)
        else:
            rewards = [float(reward(p, t)) for p, t in zip(prompt_text, texts)]
        if name == "policy":
            pol = batched_logprobs(model, prompts_rep, responses,
                                   pad_id=tokenizer.pad_token_id, temperature=temp)
            with model.disable_adapter():
                ref = batched_logprobs(model, prompts_rep, responses,
                                       pad_id=tokenizer.pad_token_id, temperature=temp)
            kls = [sum(a - b for a, b in zip(x, y)) for x, y in zip(pol, ref)]
        else:
            kls = [0.0] * len(responses)  # the reference's KL to itself
        rm, rci = mean_ci(rewards)
        km, kci = mean_ci(kls)
        rep = ModelReport(name, rm, rci, km, kci, distinct_n(texts, 1), distinct_n(texts, 2),
                          top_share(texts), texts)
        reports.append(rep)
        per_model[name] = {k: v for k, v in rep.__dict__.items() if k != "responses"}
    pol, ref = reports
    collapse = pol.distinct_2 < 0.8 * ref.distinct_2 or (
        pol.top_share > 0.1 and pol.top_share > 2 * ref.top_share
    )
    result = {
        "held_out_prompts": len(held_out),
        "samples_per_prompt": n,
        "temperature": temp,
        "models": per_model,
        "reward_gain": pol.reward_mean - ref.reward_mean,
        "distinct_2_ratio": pol.distinct_2 / ref.distinct_2 if ref.distinct_2 else float("nan"),
        "collapse_flag": bool(collapse),
        "samples": [
            {"prompt": held_out[i // n].text, "policy": pol.responses[i],
             "reference": ref.responses[i]}
            for i in range(0, min(len(pol.responses), 6 * n), n)
        ],
    }
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    result["_reports"] = reports
    return result


def format_report(result: dict) -> str:
    pol, ref = result["_reports"]
    lines = [
        f"held-out prompts: {result['held_out_prompts']} x {result['samples_per_prompt']} samples,"
        f" temperature {result['temperature']}",
        "model      reward (95% CI)   KL to ref (95% CI)  dist-1 dist-2   top-share",
        pol.row(),
        ref.row(),
        f"reward gain over reference: {result['reward_gain']:+.3f}; "
        f"distinct-2 ratio {result['distinct_2_ratio']:.2f}",
    ]
    if result["collapse_flag"]:
        lines.append("WARNING: COLLAPSE - the policy's responses lost diversity against the "
                     "reference (distinct-2 < 80% of the reference's, or one response repeats)")
    lines.append("")
    for s in result["samples"]:
        lines += [f"prompt:    {s['prompt']!r}", f"  policy:    {s['policy']!r}",
                  f"  reference: {s['reference']!r}"]
    return "\n".join(lines)
