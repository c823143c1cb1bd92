#!/usr/bin/env bash
# Submits one `rlhf-ray train` run to a Ray cluster as a Ray job; see docs/cluster.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: deploy/submit.sh [rlhf-ray train arguments ...]

Submits `rlhf-ray train ARGS` as a Ray job through the cluster's Jobs API (the dashboard),
uploads this repository as the job's working directory, and follows its logs until it ends
(the exit status is the job's: 0 succeeded, 1 failed).

  deploy/submit.sh --preset tiny run.steps=3
  deploy/submit.sh --preset default run.output_dir=/mnt/runs generator.num=6 scorer.num=2
  deploy/submit.sh --resume /mnt/runs/20260101-120000

Environment (nothing secret is read from anywhere else, nor written or printed):
  RAY_API_SERVER_ADDRESS, RAY_ADDRESS
              the dashboard's HTTP address (default http://127.0.0.1:8265, e.g. through
              `kubectl port-forward` or `ray dashboard`)
  RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or the file ~/.ray/auth_token
              the cluster's token; token authentication is always used (RAY_AUTH_MODE=token;
              any other mode is refused)
  RLHF_RAY_OUTPUT_DIR
              if set, run.output_dir=$RLHF_RAY_OUTPUT_DIR is passed before your arguments (a
              path on storage every node shares; the job's working directory is temporary)
  RLHF_RAY_RUNTIME_ENV_JSON
              replaces the job's runtime environment (JSON), e.g. to add "pip" packages
EOF
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "${RAY_AUTH_MODE}" != "token" ]]; then
  echo "submit.sh: RAY_AUTH_MODE=${RAY_AUTH_MODE}: only token authentication is supported" >&2
  exit 2
fi
if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "${HOME}/.ray/auth_token" ]]
then
  echo "submit.sh: no Ray token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or write it to" \
       "~/.ray/auth_token (see docs/cluster.md, Security)" >&2
  exit 2
fi

address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"

# The driver's ray.init adds its own env_vars (OMP_NUM_THREADS, TOKENIZERS_PARALLELISM,
# RLHF_RAY_CACHE, HF_HUB_OFFLINE); without RAY_OVERRIDE_JOB_RUNTIME_ENV=1 Ray rejects a job whose
# runtime env sets any of the same keys. Excludes keep the upload small (.gitignore is honoured
# too).
runtime_env="${RLHF_RAY_RUNTIME_ENV_JSON:-$(cat <<'EOF'
{"env_vars": {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1", "TOKENIZERS_PARALLELISM": "false"},
 "excludes": [".git", ".venv", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache"]}
EOF
)}"

train_args=()
if [[ -n "${RLHF_RAY_OUTPUT_DIR:-}" ]]; then
  train_args+=("run.output_dir=${RLHF_RAY_OUTPUT_DIR}")
fi
train_args+=("$@")

cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec ray job submit --address "${address}" --working-dir . --runtime-env-json "${runtime_env}" \
  -- rlhf-ray train ${train_args[@]+"${train_args[@]}"}
