"""Sample efficiency of replay: generated samples against held-out reward and KL.

Every arm trains the same number of learner steps (the preset's `run.steps`) on batches of the
same size; what changes is how many new samples each step gets. With replay ratio k
(`replay.samples_per_insert=k`, `replay.max_times_sampled=k`, `replay.max_staleness=k+1`) the
rate limiter lets each generated row be trained on up to k times, so the run generates about
1/k of the on-policy run's samples (more when rows go stale before their k uses: a row gets
k+2 policy versions to be drawn k times). After training, `rlhf-ray eval` scores the adapter on the held-out
prompts (reward with a 95% CI and the KL to the reference, in nats per response).

    python benchmarks/sample_efficiency.py                      # default task, all arms
    python benchmarks/sample_efficiency.py --preset tiny        # the tiny task (minutes)
    python benchmarks/sample_efficiency.py --arms r1 r2-uniform --out runs/bench

Each arm is a separate `rlhf-ray train` process followed by `rlhf-ray eval`; arms whose run
directory already holds an eval.json are read back instead of re-run, so an interrupted
benchmark resumes. A figure per arm: generated samples (the `rollout/samples` of every scored
request), learner steps, final held-out reward and KL, and the train wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# name -> overrides on top of the preset
ARMS: dict[str, list[str]] = {
    "r1": [],
    "r2-uniform": ["replay.samples_per_insert=2", "replay.max_times_sampled=2",
                   "replay.max_staleness=3"],
    "r4-uniform": ["replay.samples_per_insert=4", "replay.max_times_sampled=4",
                   "replay.max_staleness=5"],
    "r2-prioritized": ["replay.samples_per_insert=2", "replay.max_times_sampled=2",
                       "replay.max_staleness=3", "replay.sampler=prioritized"],
    "r4-prioritized": ["replay.samples_per_insert=4", "replay.max_times_sampled=4",
                       "replay.max_staleness=5", "replay.sampler=prioritized"],
    "r2-fifo": ["replay.samples_per_insert=2", "replay.max_times_sampled=2",
                "replay.max_staleness=3", "replay.sampler=fifo"],
    "r4-fifo": ["replay.samples_per_insert=4", "replay.max_times_sampled=4",
                "replay.max_staleness=5", "replay.sampler=fifo"],
    # Replay at a stronger KL penalty (the preset's kl_coef is 0.05): where on the reward/KL
    # frontier ratio 2 lands when its KL is held down.
    "r2-uniform-kl0.07": ["replay.samples_per_insert=2", "replay.max_times_sampled=2",
                          "replay.max_staleness=3", "algorithm.kl_coef=0.07"],
    "r2-uniform-kl0.1": ["replay.samples_per_insert=2", "replay.max_times_sampled=2",
                         "replay.max_staleness=3", "algorithm.kl_coef=0.1"],
}


def run_arm(name: str, preset: str, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{preset}-{name}"
    if not (run_dir / "eval.json").is_file():
        if run_dir.exists():
            raise SystemExit(f"{run_dir} holds an unfinished run; remove it to re-run {name}")
        cmd = [sys.executable, "-m", "rlhf_ray.cli", "train", "--preset", preset,
               f"run.name={run_dir.name}", f"run.output_dir={out}", "run.progress=false",
               *ARMS[name], *extra]
        print("+", " ".join(cmd[2:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        (run_dir / "train_wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
        subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "eval", str(run_dir)], check=True,
                       stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((run_dir / "eval.json").read_text())
    policy = result["models"]["policy"]
    wall = run_dir / "train_wall_s.txt"
    return {
        "arm": name,
        "generated_samples": int(sum(r.get("rollout/samples", 0) for r in records)),
        "learner_steps": len(records),
        "reward": policy["reward_mean"],
        "reward_ci": policy["reward_ci"],
        "kl": policy["kl_mean"],
        "kl_ci": policy["kl_ci"],
        "reference_reward": result["models"]["reference"]["reward_mean"],
        "distinct_2_ratio": result["distinct_2_ratio"],
        "train_wall_s": float(wall.read_text()) if wall.is_file() else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default="runs/sample_efficiency", help="parent of the run dirs")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every arm")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_arm(name, args.preset, out, args.overrides) for name in args.arms]
    base = next((r for r in rows if r["arm"] == "r1"), None)
    print(f"\npreset {args.preset}; reference reward {rows[0]['reference_reward']:+.3f}")
    print(f"{'arm':<16}{'samples':>8}{'vs r1':>7}{'steps':>6}  {'reward (95% CI)':<17}"
          f"{'KL (95% CI)':<15}{'dist-2':>7}{'train s':>9}")
    for r in rows:
        share = f"{r['generated_samples'] / base['generated_samples']:.2f}" if base else "-"
        print(f"{r['arm']:<16}{r['generated_samples']:>8}{share:>7}{r['learner_steps']:>6}  "
              f"{r['reward']:+.3f} ± {r['reward_ci']:.3f}   {r['kl']:5.2f} ± {r['kl_ci']:.2f}  "
              f"{r['distinct_2_ratio']:>7.2f}{r['train_wall_s']:>9.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
