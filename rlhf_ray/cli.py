"""`rlhf-ray`: the command line.

    rlhf-ray train [--preset NAME] [--config FILE ...] [--sync] [--address ADDR] [key=value ...]
    rlhf-ray eval RUN_DIR [--samples N] [--temperature T] [--top-p P] [--top-k K] [--limit N]
    rlhf-ray models [--prepare NAME]
    rlhf-ray presets
"""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from rlhf_ray.config import load_config
    from rlhf_ray.driver import train

    overrides = list(args.overrides)
    if args.sync:
        overrides.append("run.sync=true")
    if args.address:
        overrides.append(f"run.ray_address={args.address}")
    cfg = load_config(preset=args.preset, files=args.config or [], overrides=overrides)
    run_dir = train(cfg)
    print(f"run directory: {run_dir}")
    return 0


def _eval(args) -> int:
    from rlhf_ray.evaluation import evaluate, format_report

    result = evaluate(args.run_dir, samples_per_prompt=args.samples, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, limit=args.limit)
    print(format_report(result))
    return 0


def _models(args) -> int:
    from rlhf_ray.models.builtin import BUILTIN_MODELS, ensure_builtin

    if args.prepare:
        print(ensure_builtin(args.prepare))
        return 0
    for name, text in BUILTIN_MODELS.items():
        print(f"{name:<24} {text}")
    return 0


def _presets(args) -> int:
    from rlhf_ray.config import preset_names

    print("\n".join(preset_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="online RLHF (LoRA-PPO) on a Ray cluster")
    p.add_argument("--preset", default="default", help="named preset (`rlhf-ray presets`)")
    p.add_argument("--config", action="append", help="YAML config file (repeatable)")
    p.add_argument("--sync", action="store_true", help="generate, score, train strictly in turn")
    p.add_argument("--address", help="Ray cluster address (`auto` for `ray start --head`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-4")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="trained adapter vs reference on held-out prompts")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, help="responses per prompt per model")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N held-out prompts")
    p.set_defaults(func=_eval)

    p = sub.add_parser("models", help="list builtin models, or build one into the cache")
    p.add_argument("--prepare", metavar="NAME")
    p.set_defaults(func=_models)

    p = sub.add_parser("presets", help="list named presets")
    p.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.config import ConfigError
    from rlhf_ray.data.prompts import DataError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also stand after flags (`train --sync run.steps=2`)
    if args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, NotADirectoryError,
            ValueError) as e:
        print(f"rlhf-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
