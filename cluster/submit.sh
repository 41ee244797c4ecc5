#!/usr/bin/env bash
# Submit a Ray job that writes to MLflow, handing the MLflow client credentials of THIS shell to
# that one job only (its runtime_env env_vars), never to a node, a pod spec or a file in the repo.
#
#   MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=... \
#     cluster/submit.sh [--runtime-env FILE] [ray job submit options] -- python jobs/train_ddp.py ...
#
# - FILE (default: cluster/runtime_env.yaml next to this script) must not hold credentials itself.
# - The merged runtime_env is written to a mode-0600 temporary file, handed to `ray job submit
#   --runtime-env`, and deleted once the job is submitted: the password never appears on a
#   command line (ps), in the shell history or in the job's entrypoint.
# - MLFLOW_TRACKING_TOKEN (bearer token) is passed on instead of username/password when set.
# - With --submission-id ID, an already submitted job ID is not submitted again (the KubeRay
#   submitter pod may be retried): the script only follows its logs.
# - Every other option (--address, --working-dir, --no-wait, --entrypoint-num-cpus ...) goes to
#   `ray job submit` unchanged; --address (or $RAY_ADDRESS) also serves `ray job status/logs`.
#
# Visible to: every process of that job (driver, Ray Train workers - rank 0 logs to MLflow - and
# its Ray Data tasks) and, through the Jobs API, to holders of the cluster's Ray token
# (SECURITY.md, "MLflow credentials").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
runtime_env="$here/runtime_env.yaml"
address="${RAY_ADDRESS:-}"
submission_id=""
no_wait=0
passthrough=()
while (($#)); do
  case "$1" in
    --) break ;;
    --runtime-env) runtime_env="$2"; shift 2 ;;
    --runtime-env=*) runtime_env="${1#*=}"; shift ;;
    --runtime-env-json|--runtime-env-json=*)
      echo "submit.sh: use --runtime-env FILE (the credentials are merged into it)" >&2; exit 2 ;;
    --address) address="$2"; passthrough+=("$1" "$2"); shift 2 ;;
    --address=*) address="${1#*=}"; passthrough+=("$1"); shift ;;
    --submission-id) submission_id="$2"; shift 2 ;;
    --submission-id=*) submission_id="${1#*=}"; shift ;;
    --no-wait) no_wait=1; shift ;;
    *) passthrough+=("$1"); shift ;;
  esac
done
if [[ $# -lt 2 || "$1" != "--" ]]; then
  echo "usage: $0 [--runtime-env FILE] [ray job submit options] -- python jobs/X.py ..." >&2
  exit 2
fi
shift  # the "--"

if [[ -z "${MLFLOW_TRACKING_TOKEN:-}" && ( -z "${MLFLOW_TRACKING_USERNAME:-}" || -z "${MLFLOW_TRACKING_PASSWORD:-}" ) ]]; then
  echo "submit.sh: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)" \
       "in this command's environment; they are passed to this job only" >&2
  exit 2
fi
[[ -f "$runtime_env" ]] || { echo "submit.sh: no runtime_env file $runtime_env" >&2; exit 2; }

addr_args=()
[[ -n "$address" ]] && addr_args=(--address "$address")
if [[ -z "$submission_id" ]]; then
  submission_id="hmhn-$(date -u +%Y%m%dT%H%M%SZ)-$RANDOM"
fi

if ray job status ${addr_args[@]+"${addr_args[@]}"} "$submission_id" >/dev/null 2>&1; then
  echo "submit.sh: job $submission_id was already submitted; following its logs"
else
  umask 077
  merged="$(mktemp "${TMPDIR:-/tmp}/hmhn-runtime-env.XXXXXXXX")"
  trap 'rm -f "$merged"' EXIT
  # Credentials travel through this process's environment into the 0600 file, nowhere else.
  "${PYTHON:-python3}" - "$runtime_env" "$merged" <<'PY'
import json, os, sys

import yaml

src, dst = sys.argv[1], sys.argv[2]
with open(src) as f:
    env = yaml.safe_load(f) or {}
env_vars = dict(env.get("env_vars") or {})
names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
committed = sorted(n for n in names if n in env_vars)
if committed:
    sys.exit(f"submit.sh: {src} sets {', '.join(committed)}: credentials never go into a runtime_env file")
for name in names:
    if os.environ.get(name):
        env_vars[name] = os.environ[name]
env["env_vars"] = env_vars
with open(dst, "w") as f:
    json.dump(env, f)  # JSON is YAML: `ray job submit --runtime-env` reads it
PY
  ray job submit ${passthrough[@]+"${passthrough[@]}"} --submission-id "$submission_id" --runtime-env "$merged" --no-wait -- "$@"
  rm -f "$merged"
  trap - EXIT
fi

if ((no_wait)); then
  exit 0
fi
exec ray job logs ${addr_args[@]+"${addr_args[@]}"} --follow "$submission_id"
