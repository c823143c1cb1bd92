"""Typed, nested run configuration: one dataclass per role, YAML files, dotted overrides.

The dataclasses below are the single source of defaults. A run's config is built as

    defaults  <-  preset YAML (``--preset tiny``)  <-  ``--config file.yaml``  <-  ``a.b=value``

with OmegaConf structured configs doing the merging and type checks, then ``validate`` rejects
impossible combinations, all before any actor starts. Errors name the key (and, for YAML files,
the file and line).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Builtin model name (`rlhf-ray models`), a local HF folder, or a hub name already cached."""
    dtype: str = "float32"
    """Weights dtype: float32 | bfloat16 | float16."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless asked for: it executes that code."""
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names LoRA wraps; ["all-linear"] wraps every linear layer except the output head."""
    adapter_path: Optional[str] = None
    """Start from an existing LoRA adapter (a `save_pretrained` folder) instead of a fresh one."""
    cache_dir: Optional[str] = None
    """Where builtin models are converted to; default ~/.cache/rlhf_ray (or $RLHF_RAY_CACHE)."""


@dataclass
class DataConfig:
    prompts: str = "movie-review-openings"
    """Builtin prompt set (`movie-review-openings`, `tiny-counting`) or a .jsonl/.txt/.parquet file."""
    prompt_field: str = "prompt"
    """Field holding the prompt text in a JSONL or Parquet file."""
    opening_words: int = 4
    """movie-review-openings: how many leading words of each review sentence form the prompt."""
    eval_fraction: float = 0.2
    """Share of prompts held out for `rlhf-ray eval` (a fixed split by prompt uid hash)."""
    max_prompt_tokens: int = 64
    """Prompts longer than this (in tokens) follow `prompt_overflow`."""
    prompt_overflow: str = "truncate"
    """truncate: keep the LAST max_prompt_tokens tokens (the text nearest the response); drop: skip
    the prompt. Either way the prompt is counted in rollout/prompts_truncated or _dropped."""
    seed: int = 0
    """Shuffles the order prompts are served in, one permutation per pass."""


@dataclass
class GeneratorConfig:
    num: int = 1
    """Generator actors."""
    backend: str = "hf"
    """hf (transformers generate) | vllm."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per generator actor (e.g. {generator_node: 1} to pin generators to
    a worker group that advertises it)."""
    label_selector: Dict[str, str] = field(default_factory=dict)
    """Node labels a generator actor must run on (Ray's label_selector, e.g.
    {ray.io/accelerator-type: A100})."""
    torch_threads: int = 1
    prompts_per_request: int = 8
    """Prompts in one generate call; each yields `n_samples` responses."""
    n_samples: int = 4
    """Responses per prompt (the group for group baselines)."""
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k truncation."""
    seed: int = 0
    """Base seed; generator i samples with a seed derived from (seed, i, request)."""


@dataclass
class ScorerConfig:
    num: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per scorer actor."""
    label_selector: Dict[str, str] = field(default_factory=dict)
    """Node labels a scorer actor must run on (Ray's label_selector)."""
    torch_threads: int = 1
    reward: str = "vader"
    """Builtin reward fn (`vader`, `letter-e`), a Python callable `module:function` (runs that code),
    or `model:PATH` for an HF sequence-classification reward model."""
    reward_batch_size: int = 32
    """Rows per reference/reward-model forward pass."""
    reward_timeout_s: float = 30.0
    """Seconds one reward-function call may take; a call that takes longer quarantines its sample
    ('timed out'). 0 disables the limit. Reward models (`model:PATH`) run without one."""
    max_hung_rewards: int = 4
    """Reward calls still running after their timeout that the scorer tolerates; beyond that it
    raises, naming the reward."""


@dataclass
class ReplayConfig:
    num_shards: int = 2
    capacity: int = 4096
    """Rows per shard; FIFO eviction beyond it."""
    max_staleness: int = 1
    """Rows more than this many policy versions behind the learner are never sampled."""
    max_times_sampled: int = 1
    """How often one row may be drawn (1 = each sample trains once)."""
    sample_timeout_s: float = 600.0
    """A learner waiting longer than this for enough eligible rows stops the run with an error."""
    sampler: str = "uniform"
    """uniform | fifo (oldest eligible rows first: with a replay ratio, each row is used before
    it goes stale) | prioritized (P(i) proportional to priority^alpha, importance-weighted)."""
    priority_alpha: float = 0.6
    """Priority exponent of the prioritized sampler (0 = uniform)."""
    priority_beta: float = 0.4
    """Importance-weight exponent at step 0, annealed linearly to 1 at run.steps."""
    min_priority: float = 1e-3
    """Priorities below this count as this, so no row is starved."""
    samples_per_insert: Optional[float] = None
    """Rate limit: rows sampled per row inserted (the replay ratio). null: no limiter; the
    async driver then paces generation by its look-ahead alone."""
    min_size_to_sample: Optional[int] = None
    """Rows inserted before the first sample when rate-limited; default learner.batch_size."""
    error_buffer: Optional[float] = None
    """How far inserts*samples_per_insert - samples may drift (rows, buffer-wide); default
    2 * learner.batch_size * max(1, samples_per_insert)."""
    insert_timeout_s: float = 600.0
    """A scorer whose insert is held back by the rate limiter longer than this is an error."""
    durable: bool = True
    """Shards keep a write-ahead log and snapshots under RUN_DIR/replay and survive restarts."""
    snapshot_every: int = 200
    """Mutating operations between two snapshots of a durable shard."""
    fsync: bool = False
    """fsync every log record (survives machine crashes, not only process kills; slower)."""
    offline_files: list[str] = field(default_factory=list)
    """Experience Parquet (e.g. from `rlhf-ray buffer export`) or scored JSONL
    ({"prompt", "response", "reward"} per line) loaded into the offline table."""
    offline_fraction: float = 0.0
    """Share of each learner batch drawn from the offline table."""


@dataclass
class LearnerConfig:
    num: int = 1
    """Data-parallel learner actors, one torch.distributed group (gloo; the models run on CPU):
    each draws batch_size / num rows, gradients are summed with token-mean weights over the
    whole batch, rank 0 publishes and checkpoints."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per learner actor (e.g. {learner_node: 1} to pin learners to a
    worker group that advertises it)."""
    label_selector: Dict[str, str] = field(default_factory=dict)
    """Node labels a learner actor must run on (Ray's label_selector; per bundle with
    num > 1)."""
    placement: str = "PACK"
    """With num > 1: the placement-group strategy of the learners' bundles (PACK, SPREAD,
    STRICT_PACK, STRICT_SPREAD)."""
    dist_timeout_s: float = 300.0
    """How long a collective waits for the other learners before it fails."""
    torch_threads: int = 1
    batch_size: int = 32
    """Rows drawn from the buffer per learner step."""
    num_minibatches: int = 1
    """Optimizer steps per epoch over one batch."""
    ppo_epochs: int = 1
    micro_batch_size: int = 8
    """Rows per forward/backward; gradients accumulate to the minibatch with token-mean weights."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_schedule: str = "constant"
    """constant | linear | cosine (decay to 0 over run.steps optimizer steps, after warmup)."""
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    value_lr: Optional[float] = None
    """Learning rate of the value head; default the same as lr."""


@dataclass
class AlgorithmConfig:
    name: str = "ppo"
    advantage: str = "grpo"
    """grpo (group mean/std) | rloo (leave-one-out mean) | gae (value head + GAE)."""
    normalize_std: bool = True
    """grpo: divide by the group's std."""
    whiten_advantages: bool = False
    """Whiten advantages over the batch's valid tokens before the loss."""
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    """Upper clip bound (1 + clip_eps_high); default the same as clip_eps."""
    ratio_anchor: str = "proximal"
    """proximal: ratio against the policy the learner held when the batch was drawn, with a
    truncated importance weight min(exp(proximal - behavior), is_cap) for the generator's policy
    (decoupled PPO); behavior: ratio directly against behavior_logprobs (plain PPO)."""
    is_cap: float = 2.0
    kl_mode: str = "reward"
    """reward: -kl_coef * KL per token as reward shaping; loss: kl_coef * KL as a loss term;
    none: no KL to the reference."""
    kl_estimator: str = "k1"
    """k1 | k2 | k3 (Schulman's estimators of KL(policy || reference))."""
    kl_coef: float = 0.05
    kl_controller: str = "fixed"
    """fixed | adaptive (Ziegler et al.; moves kl_coef towards kl_target, within bounds)."""
    kl_target: float = 1.0
    kl_horizon: int = 100
    kl_min: float = 0.001
    kl_max: float = 1.0
    entropy_coef: float = 0.0
    vf_coef: float = 0.5
    value_clip: Optional[float] = 0.2


@dataclass
class RunConfig:
    name: Optional[str] = None
    """Run directory name under output_dir; default a timestamp."""
    output_dir: str = "runs"
    steps: int = 40
    """Learner steps (each one batch, then a weight publish)."""
    sync: bool = False
    """Generate, score and train strictly in turn instead of the asynchronous pipeline."""
    seed: int = 0
    ray_address: Optional[str] = None
    """Join this Ray cluster (`auto` = the one `ray start --head` started); default: a local one."""
    ray_num_cpus: Optional[int] = None
    """CPUs of the local Ray started when ray_address is unset; default the machine's count."""
    log_samples_every: int = 10
    """Log sample responses every N learner steps."""
    eval_samples_per_prompt: int = 4
    """`rlhf-ray eval`: responses per held-out prompt, for each of policy and reference."""
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    max_restarts: int = 3
    """How often Ray restarts a dead generator or scorer actor (its in-flight request is
    retried on the restarted actor); a dead learner is replaced from the last checkpoint
    instead (run.max_learner_restarts)."""
    max_failures: int = 3
    """Requests of one role (generate or score) that may fail in a row before the run stops
    with an error naming the role; each failed request's prompts count as dropped."""
    checkpoint_every: int = 10
    """Write a run checkpoint (learner state, buffer, driver state) every N learner steps; 0:
    only the final one. The asynchronous loop drains its in-flight requests first."""
    keep_checkpoints: int = 2
    """Checkpoints kept in RUN_DIR/checkpoints (the newest ones)."""
    max_learner_restarts: int = 3
    """A learner that dies is replaced and the run continues from the last checkpoint, at
    most this many times; then the run stops with an error naming the learner."""
    watchdog_timeout_s: float = 600.0
    """A role with work in flight and no progress for this long is reported as stalled (log
    and `health/` metrics); 0 disables the watchdog."""


@dataclass
class OfflineConfig:
    """`rlhf-ray offline`: learning from stored data, without rollouts."""

    algo: str = "dpo"
    """dpo | ipo (preference pairs), iql | cql (token-level Q learning on scored samples; cql is
    iql plus the conservative penalty weighted by `cql_alpha`)."""
    data: str = ""
    """The data; empty picks the builtin set of the algorithm: `movie-review-preferences` for
    dpo/ipo, `movie-review-samples` for iql/cql. Pairs: a .jsonl or .parquet file of (prompt,
    chosen, rejected), or a replay-buffer export (`rlhf-ray buffer export`), paired best against
    worst response of each prompt group. Scored samples: (prompt, response, reward) files, pair
    files (chosen scores 1, rejected 0), or a buffer export (every row a sample)."""
    eval_fraction: float = 0.2
    """Held-out share of a file's pairs or samples, split by prompt (builtin sets have their
    own split, the prompts' data.eval_fraction)."""
    beta: float = 0.1
    """DPO: the implicit KL coefficient (implicit reward = beta * log pi/ref)."""
    label_smoothing: float = 0.0
    """DPO: cDPO's label-flip probability, in [0, 0.5)."""
    ipo_tau: float = 0.1
    """IPO: the margin target is 1 / (2 tau), on per-token mean log-ratios."""
    max_bad_rows: int = 0
    """Malformed data rows skipped (reported by line/row and field); one more stops the run
    before training."""
    max_response_tokens: int = 48
    """Responses are cut to this many tokens (their first ones); a cut scored sample counts as
    truncated (its value is bootstrapped)."""
    rejected_per_prompt: int = 8
    """Builtin pairs: rejected continuations drawn per prompt."""
    negative_prompts: bool = True
    """Builtin pairs: also pair negative openings (positive continuation of another sentence as
    chosen, its own as rejected), so coherence alone cannot rank the pairs."""
    samples_per_prompt: int = 8
    """Builtin scored samples: responses per opening (its own continuation and others')."""
    eval_every: int = 10
    """Learner steps between held-out evaluations (and at the end)."""
    eval_pairs: int = 256
    """Held-out pairs (dpo/ipo) or samples (iql/cql) evaluated at most (the first ones)."""
    gamma: float = 1.0
    """IQL/CQL: discount per token."""
    td_lambda: float = 0.0
    """IQL/CQL: lambda of the Q targets' returns, in [0, 1]; 0 is IQL's one-step target
    r + gamma * V(s'), 1 the data's Monte-Carlo return."""
    tau_expectile: float = 0.7
    """IQL/CQL: the expectile of the V regression, in (0, 1); above 0.5 V leans towards the
    best in-data action."""
    awr_beta: float = 0.1
    """IQL/CQL: advantage-weighted regression temperature (weights exp(A / beta))."""
    awr_max_weight: float = 20.0
    """IQL/CQL: cap on the AWR weights, >= 1."""
    polyak_tau: float = 0.1
    """IQL/CQL: target-Q update rate per step (short runs here: a few hundred steps at most)."""
    cql_alpha: float = 0.1
    """CQL: weight of the conservative penalty (logsumexp_a Q - Q of the data token); iql
    ignores it."""
    q_rank: int = 64
    """IQL/CQL: rank of the Q head over the vocabulary (H -> r -> V); 0 builds the full head."""
    q_lr: float = 1.0e-3
    """IQL/CQL: learning rate of the Q and V heads (the adapter uses learner.lr)."""
    q_updates_per_step: int = 8
    """IQL/CQL: updates of the Q and V heads (each with a Polyak step of the target) per policy
    step, on that step's batch; cheap (the heads read stored states), and each one carries
    the end-of-response reward one more token back through the TD targets."""
    q_warmup_steps: int = 0
    """IQL/CQL: steps that fit only Q and V before the policy starts to move (their AWR weights
    are all about 1 at the start)."""
    pretrain_steps: int = 0
    """`rlhf-ray train` only: first this many offline steps (offline.algo on offline.data, into
    RUN_DIR/pretrain), then online training starting from, and referenced to, that adapter."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    run: RunConfig = field(default_factory=RunConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OFFLINE_ALGOS = ("dpo", "ipo", "iql", "cql")
PAIR_ALGOS = ("dpo", "ipo")


def offline_data(cfg: Config) -> str:
    """`offline.data`, or the builtin set of the algorithm when it is empty."""
    if cfg.offline.data:
        return cfg.offline.data
    return "movie-review-preferences" if cfg.offline.algo in PAIR_ALGOS else "movie-review-samples"


def pretrain_config(cfg: Config) -> Config:
    """The offline run of `offline.pretrain_steps` that precedes online training."""
    import copy

    pre = copy.deepcopy(cfg)
    pre.run.steps = cfg.offline.pretrain_steps
    pre.offline.pretrain_steps = 0
    pre.learner.num = 1
    return pre


def preset_names() -> list[str]:
    root = importlib.resources.files("rlhf_ray") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _preset_path(name: str) -> Path:
    root = importlib.resources.files("rlhf_ray") / "presets"
    path = Path(str(root / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return path


def _yaml_line(path: Path, dotted_key: str) -> Optional[int]:
    """1-based line of `dotted_key` in a YAML mapping file, or None."""
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return None
    line = None
    for part in dotted_key.split("."):
        if not isinstance(node, yaml.MappingNode):
            return line
        for key_node, value_node in node.value:
            if key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            return line
    return line


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _merge_file(base, path: Path, *, preset_chain: tuple[str, ...] = ()):
    """Merges one YAML file onto ``base``. A preset (``preset_chain`` non-empty: the presets
    being merged) may name another preset under a top-level ``base:`` key, merged first."""
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    if preset_chain and "base" in data:
        parent = data.pop("base")
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: base: expected a preset name, got {parent!r}")
        if parent in preset_chain:
            chain = " -> ".join((*preset_chain, parent))
            raise ConfigError(f"{path}: base: {parent!r} makes the presets loop ({chain})")
        base = _merge_file(base, _preset_path(parent), preset_chain=(*preset_chain, parent))
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        line = _yaml_line(path, key) if key else None
        where = f"{path}:{line}" if line else str(path)
        what = f"key {key!r}" if key else "a section is not a mapping of keys"
        raise ConfigError(f"{where}: {what}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def load_config(
    *,
    preset: Optional[str] = None,
    files: tuple[str, ...] | list[str] = (),
    overrides: tuple[str, ...] | list[str] = (),
) -> Config:
    """Builds and validates a Config from a preset, YAML files and `a.b=value` overrides."""
    cfg = OmegaConf.structured(Config)
    if preset:
        cfg = _merge_file(cfg, _preset_path(preset), preset_chain=(preset,))
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found (or not a file): {f}")
        cfg = _merge_file(cfg, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. learner.lr=1e-4")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            key = getattr(e, "full_key", None) or item.split("=", 1)[0]
            raise ConfigError(f"override {item!r}: key {key!r}: {_first_line(e)}") from None
    result = OmegaConf.to_object(cfg)
    validate(result)
    return result


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuilds a Config saved with `to_dict` (e.g. a run directory's config.yaml)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), data)
    except OmegaConfBaseException as e:
        raise ConfigError(f"key {getattr(e, 'full_key', '')!r}: {_first_line(e)}") from None
    result = OmegaConf.to_object(cfg)
    validate(result)
    return result


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value}: must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value}: must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config) -> None:
    """Rejects impossible combinations before any actor starts."""
    g, a, lrn, rep, m, d = cfg.generator, cfg.algorithm, cfg.learner, cfg.replay, cfg.model, cfg.data
    _choice("model.dtype", m.dtype, ("float32", "bfloat16", "float16"))
    _choice("generator.backend", g.backend, ("hf", "vllm"))
    _choice("data.prompt_overflow", d.prompt_overflow, ("truncate", "drop"))
    _choice("algorithm.name", a.name, ("ppo",))
    _choice("algorithm.advantage", a.advantage, ("grpo", "rloo", "gae"))
    _choice("algorithm.ratio_anchor", a.ratio_anchor, ("proximal", "behavior"))
    _choice("algorithm.kl_mode", a.kl_mode, ("reward", "loss", "none"))
    _choice("algorithm.kl_estimator", a.kl_estimator, ("k1", "k2", "k3"))
    _choice("algorithm.kl_controller", a.kl_controller, ("fixed", "adaptive"))
    _choice("learner.lr_schedule", lrn.lr_schedule, ("constant", "linear", "cosine"))
    for key, value in [
        ("generator.num", g.num),
        ("generator.prompts_per_request", g.prompts_per_request),
        ("generator.n_samples", g.n_samples),
        ("generator.max_new_tokens", g.max_new_tokens),
        ("generator.temperature", g.temperature),
        ("generator.torch_threads", g.torch_threads),
        ("scorer.num", cfg.scorer.num),
        ("scorer.reward_batch_size", cfg.scorer.reward_batch_size),
        ("replay.num_shards", rep.num_shards),
        ("replay.capacity", rep.capacity),
        ("replay.max_times_sampled", rep.max_times_sampled),
        ("learner.num", lrn.num),
        ("learner.batch_size", lrn.batch_size),
        ("learner.num_minibatches", lrn.num_minibatches),
        ("learner.ppo_epochs", lrn.ppo_epochs),
        ("learner.micro_batch_size", lrn.micro_batch_size),
        ("learner.lr", lrn.lr),
        ("model.lora_rank", m.lora_rank),
        ("data.max_prompt_tokens", d.max_prompt_tokens),
        ("run.steps", cfg.run.steps),
        ("run.max_failures", cfg.run.max_failures),
        ("run.keep_checkpoints", cfg.run.keep_checkpoints),
        ("algorithm.is_cap", a.is_cap),
        ("replay.sample_timeout_s", rep.sample_timeout_s),
        ("replay.insert_timeout_s", rep.insert_timeout_s),
        ("replay.snapshot_every", rep.snapshot_every),
        ("replay.min_priority", rep.min_priority),
        ("model.lora_alpha", m.lora_alpha),
    ]:
        _positive(key, value)
    for key, value in [
        ("replay.max_staleness", rep.max_staleness),
        ("replay.priority_alpha", rep.priority_alpha),
        ("replay.priority_beta", rep.priority_beta),
        ("algorithm.kl_coef", a.kl_coef),
        ("algorithm.entropy_coef", a.entropy_coef),
        ("learner.max_grad_norm", lrn.max_grad_norm),
        ("generator.num_gpus", g.num_gpus),
        ("learner.num_gpus", lrn.num_gpus),
        ("scorer.num_gpus", cfg.scorer.num_gpus),
        ("learner.warmup_steps", lrn.warmup_steps),
        ("learner.weight_decay", lrn.weight_decay),
        ("model.lora_dropout", m.lora_dropout),
        ("run.log_samples_every", cfg.run.log_samples_every),
        ("run.max_restarts", cfg.run.max_restarts),
        ("run.checkpoint_every", cfg.run.checkpoint_every),
        ("run.max_learner_restarts", cfg.run.max_learner_restarts),
        ("run.watchdog_timeout_s", cfg.run.watchdog_timeout_s),
        ("generator.num_cpus", g.num_cpus),
        ("scorer.num_cpus", cfg.scorer.num_cpus),
        ("scorer.reward_timeout_s", cfg.scorer.reward_timeout_s),
        ("scorer.max_hung_rewards", cfg.scorer.max_hung_rewards),
        ("learner.num_cpus", lrn.num_cpus),
        ("algorithm.vf_coef", a.vf_coef),
    ]:
        _positive(key, value, allow_zero=True)
    if m.lora_dropout >= 1:
        raise ConfigError(f"model.lora_dropout={m.lora_dropout}: must be in [0, 1)")
    if cfg.run.ray_num_cpus is not None and cfg.run.ray_num_cpus < 1:
        raise ConfigError(f"run.ray_num_cpus={cfg.run.ray_num_cpus}: must be >= 1")
    if cfg.run.name is not None and (not cfg.run.name or "/" in cfg.run.name
                                     or cfg.run.name in (".", "..")):
        raise ConfigError(f"run.name={cfg.run.name!r}: must be a plain folder name")
    if not 0 < a.clip_eps < 1:
        raise ConfigError(f"algorithm.clip_eps={a.clip_eps}: must be in (0, 1)")
    if not 0 < d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction}: must be in (0, 1)")
    if not 0 <= a.lam <= 1 or not 0 < a.gamma <= 1:
        raise ConfigError(f"algorithm.gamma={a.gamma}, algorithm.lam={a.lam}: need 0<gamma<=1, 0<=lam<=1")
    # The learner recomputes log-probs of the full temperature-scaled distribution; a truncated
    # (top-p / top-k) sampling distribution would make every PPO ratio wrong.
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generator.top_p={g.top_p}: must be in (0, 1]")
    if g.top_k < 0:
        raise ConfigError(f"generator.top_k={g.top_k}: must be >= 0")
    if g.top_p != 1.0:
        raise ConfigError(
            f"generator.top_p={g.top_p}: training needs top_p=1.0, because the learner recomputes "
            "log-probs of the full temperature-scaled distribution and would not reproduce a "
            "top-p truncated one (truncated sampling is allowed in `rlhf-ray eval`)"
        )
    if g.top_k != 0:
        raise ConfigError(
            f"generator.top_k={g.top_k}: training needs top_k=0, because the learner would not "
            "reproduce a top-k truncated sampling distribution"
        )
    if a.advantage in ("grpo", "rloo") and g.n_samples < 2:
        raise ConfigError(
            f"algorithm.advantage={a.advantage!r} needs generator.n_samples >= 2 "
            f"(a group baseline of one sample is always 0), got {g.n_samples}"
        )
    if lrn.batch_size % lrn.num_minibatches:
        raise ConfigError(
            f"learner.batch_size={lrn.batch_size} is not divisible by "
            f"learner.num_minibatches={lrn.num_minibatches}"
        )
    if lrn.batch_size > rep.capacity * rep.num_shards:
        raise ConfigError(
            f"learner.batch_size={lrn.batch_size} exceeds the buffer's total capacity "
            f"replay.capacity*replay.num_shards={rep.capacity * rep.num_shards}"
        )
    if a.kl_mode == "reward" and a.kl_estimator == "k2":
        raise ConfigError(
            "algorithm.kl_estimator='k2' with kl_mode='reward': k2 is not an unbiased per-token "
            "reward penalty; use k1 (or k3) for reward shaping"
        )
    _choice("replay.sampler", rep.sampler, ("uniform", "fifo", "prioritized"))
    if rep.priority_beta > 1:
        raise ConfigError(f"replay.priority_beta={rep.priority_beta}: must be in [0, 1]")
    # weights max(p, min_priority)^alpha stay representable in float64 within these bounds
    if rep.priority_alpha > 1:
        raise ConfigError(f"replay.priority_alpha={rep.priority_alpha}: must be in [0, 1]")
    if rep.min_priority < 1e-12:
        raise ConfigError(f"replay.min_priority={rep.min_priority}: must be >= 1e-12")
    if rep.samples_per_insert is not None:
        spi = rep.samples_per_insert
        _positive("replay.samples_per_insert", spi)
        if rep.max_times_sampled < math.ceil(spi):
            raise ConfigError(
                f"replay.max_times_sampled={rep.max_times_sampled} < replay.samples_per_insert="
                f"{spi}: rows could never be sampled as often as the rate limit asks"
            )
        if rep.max_staleness + 1 < math.ceil(spi):
            raise ConfigError(
                f"replay.max_staleness={rep.max_staleness} with replay.samples_per_insert={spi}: "
                "a row is drawn at most once per learner step, so it goes stale before it can "
                f"be sampled {math.ceil(spi)} times; set replay.max_staleness >= "
                f"{math.ceil(spi) - 1}"
            )
        if rep.error_buffer is not None:
            _positive("replay.error_buffer", rep.error_buffer)
        if rep.min_size_to_sample is not None and (
                rep.min_size_to_sample > rep.capacity * rep.num_shards):
            raise ConfigError(
                f"replay.min_size_to_sample={rep.min_size_to_sample} exceeds the buffer's "
                f"capacity replay.capacity*replay.num_shards={rep.capacity * rep.num_shards}"
            )
        eb = replay_error_buffer(cfg)
        if eb < rep.num_shards * max(1.0, spi):
            given = "" if rep.error_buffer is not None else " (the default, 2 * batch_size * spi)"
            raise ConfigError(
                f"replay.error_buffer={eb:g}{given}: must be >= replay.num_shards * max(1, "
                f"samples_per_insert) = {rep.num_shards * max(1.0, spi):g}"
            )
        if replay_min_size(cfg) < 1:
            raise ConfigError(f"replay.min_size_to_sample={rep.min_size_to_sample}: must be >= 1")
    if not 0 <= rep.offline_fraction < 1:
        raise ConfigError(f"replay.offline_fraction={rep.offline_fraction}: must be in [0, 1)")
    if rep.offline_fraction > 0 and not rep.offline_files:
        raise ConfigError("replay.offline_fraction > 0 needs replay.offline_files")
    if lrn.batch_size % lrn.num or (lrn.batch_size // lrn.num) % lrn.num_minibatches:
        raise ConfigError(
            f"learner.batch_size={lrn.batch_size} must split evenly over learner.num={lrn.num} "
            f"learners and, per learner, into learner.num_minibatches={lrn.num_minibatches}"
        )
    off = cfg.offline
    _choice("offline.algo", off.algo, OFFLINE_ALGOS)
    for key, value in [("offline.beta", off.beta), ("offline.ipo_tau", off.ipo_tau),
                       ("offline.max_response_tokens", off.max_response_tokens),
                       ("offline.rejected_per_prompt", off.rejected_per_prompt),
                       ("offline.samples_per_prompt", off.samples_per_prompt),
                       ("offline.eval_every", off.eval_every),
                       ("offline.eval_pairs", off.eval_pairs), ("offline.q_lr", off.q_lr),
                       ("offline.q_updates_per_step", off.q_updates_per_step)]:
        _positive(key, value)
    for key, value in [("offline.max_bad_rows", off.max_bad_rows), ("offline.q_rank", off.q_rank),
                       ("offline.q_warmup_steps", off.q_warmup_steps),
                       ("offline.pretrain_steps", off.pretrain_steps)]:
        _positive(key, value, allow_zero=True)
    if off.algo in ("iql", "cql"):
        from rlhf_ray.algorithms.iql import check_iql_settings

        try:
            check_iql_settings(
                off.awr_beta, off.awr_max_weight, off.tau_expectile, gamma=off.gamma,
                polyak_tau=off.polyak_tau, cql_alpha=off.cql_alpha,
                names={k: f"offline.{k}" for k in ("tau_expectile", "gamma", "polyak_tau",
                                                  "cql_alpha")}
                | {"beta": "offline.awr_beta", "max_weight": "offline.awr_max_weight"})
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0.0 <= off.td_lambda <= 1.0:
            raise ConfigError(f"offline.td_lambda={off.td_lambda}: must be in [0, 1]")
        # `rlhf-ray offline` trains run.steps, a pre-training offline.pretrain_steps
        limits = [(cfg.run.steps, "run.steps")]
        if off.pretrain_steps:
            limits.append((off.pretrain_steps, "offline.pretrain_steps"))
        for steps, key in limits:
            if off.q_warmup_steps >= steps:
                raise ConfigError(f"offline.q_warmup_steps={off.q_warmup_steps}: must be below "
                                  f"{key}={steps}, or the policy never trains")
    if not 0 <= off.label_smoothing < 0.5:
        raise ConfigError(f"offline.label_smoothing={off.label_smoothing}: must be in [0, 0.5)")
    if not 0 < off.eval_fraction < 1:
        raise ConfigError(f"offline.eval_fraction={off.eval_fraction}: must be in (0, 1)")
    for role in ("generator", "scorer", "learner"):
        for name, amount in getattr(cfg, role).resources.items():
            _positive(f"{role}.resources.{name}", amount)
    _choice("learner.placement", lrn.placement, ("PACK", "SPREAD", "STRICT_PACK",
                                                  "STRICT_SPREAD"))
    if g.backend == "vllm":
        raise ConfigError(
            "generator.backend='vllm': the vLLM backend is not implemented yet; use 'hf'"
        )


def batch_split(cfg: Config, world: int = 1) -> tuple[int, int]:
    """``(online, offline)`` rows of one learner batch: ``replay.offline_fraction`` of it from
    the offline table when one is configured, at least one row from the online table. With
    ``world`` data-parallel learners, the share of one of them (``batch_size / world`` rows)."""
    n = cfg.learner.batch_size // world
    offline = min(round(n * cfg.replay.offline_fraction), n - 1) if cfg.replay.offline_files else 0
    return n - offline, offline


def replay_min_size(cfg: Config) -> int:
    """The rate limiter's buffer-wide minimum size before sampling."""
    rep = cfg.replay
    return cfg.learner.batch_size if rep.min_size_to_sample is None else rep.min_size_to_sample


def replay_error_buffer(cfg: Config) -> float:
    """The rate limiter's buffer-wide error buffer (rows)."""
    rep = cfg.replay
    if rep.error_buffer is not None:
        return float(rep.error_buffer)
    return 2.0 * cfg.learner.batch_size * max(1.0, rep.samples_per_insert or 1.0)


def preflight(cfg: Config) -> None:
    """Checks paths and the reward spec in the driver, before Ray or any actor starts.

    A `module:function` reward is imported here once, so this runs that module's import-time
    code in the driver process as well as in the scorers.
    """
    from rlhf_ray.models.builtin import BUILTIN_MODELS

    if cfg.replay.offline_files:
        from rlhf_ray.replay.offline import check_offline_files

        check_offline_files(cfg)
    m = cfg.model
    if m.name not in BUILTIN_MODELS:
        path = Path(m.name).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise ConfigError(f"model.name={m.name!r}: the folder has no config.json")
        if not path.exists() and (m.name.startswith((".", "/", "~")) or m.name.count("/") != 1):
            raise ConfigError(
                f"model.name={m.name!r}: not a builtin ({', '.join(BUILTIN_MODELS)}) and no "
                "such folder"
            )
    if m.adapter_path and not (Path(m.adapter_path) / "adapter_config.json").is_file():
        raise ConfigError(
            f"model.adapter_path={m.adapter_path!r}: no adapter_config.json there "
            "(expected a `save_pretrained` LoRA folder)"
        )
    spec = cfg.scorer.reward
    from rlhf_ray.scoring.rewards import BUILTIN_REWARDS, load_callable

    if spec.startswith("model:"):
        if not (Path(spec[len("model:"):]) / "config.json").is_file():
            raise ConfigError(f"scorer.reward={spec!r}: no reward-model folder with config.json")
    elif spec not in BUILTIN_REWARDS:
        if ":" not in spec:
            raise ConfigError(
                f"scorer.reward={spec!r}: not a builtin ({', '.join(BUILTIN_REWARDS)}), "
                "a 'module:function' or a 'model:PATH'"
            )
        try:
            load_callable(spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        except Exception as e:  # the module raised while being imported
            raise ConfigError(f"scorer.reward={spec!r}: importing it raised {e!r}") from None
