#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM: a single host (v4-8, v5e-8, ...) or a pod
# slice (v4-32, v5e-64, ...). Every worker runs the same train.py; jax.distributed.initialize()
# finds the other workers by itself on Cloud TPU, and the batch is split over all their chips.
#
#   scripts/launch_tpu_pod.sh install NAME ZONE           # clone (or pull) and pip install everywhere
#   scripts/launch_tpu_pod.sh env NAME ZONE [BATCH]       # what JAX sees on each worker
#   scripts/launch_tpu_pod.sh train NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   scripts/launch_tpu_pod.sh stop NAME ZONE              # SIGTERM: save a checkpoint and exit
#
# Environment: REPO (git URL to clone; default: this checkout's origin), REPO_DIR (where on the
# workers; default: diffusion_jax in the home folder). WORKDIR should be a gs:// bucket path (every
# worker writes its share of each checkpoint there). `train` stays attached: closing this terminal
# ends the run; run it inside tmux or screen for long jobs, then rerun the same line to resume.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 name=$2 zone=$3
shift 3
repo_dir=${REPO_DIR:-diffusion_jax}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}

case "$action" in
  install)
    repo=${REPO:-$(git -C "$(dirname "$0")" config --get remote.origin.url || true)}
    [[ -n "$repo" ]] || { echo "set REPO=<git URL of diffusion_jax>" >&2; exit 2; }
    on_all_workers "set -e; if [ -d $repo_dir ]; then git -C $repo_dir pull --ff-only; \
else git clone $repo $repo_dir; fi; cd $repo_dir && pip install -e '.[tpu]' gcsfs"
    ;;
  env)
    batch=${1:-}
    on_all_workers "cd $repo_dir && python3 -m diffusion_jax.env --distributed ${batch:+--batch_size $batch}"
    ;;
  train)
    [[ $# -ge 2 ]] || usage
    config=$(printf '%q' "$1") workdir=$(printf '%q' "$2")
    shift 2
    extra=""
    [[ $# -eq 0 ]] || extra=$(printf ' %q' "$@")  # quoted for the remote shell
    on_all_workers "cd $repo_dir && python3 train.py --config $config --workdir $workdir$extra"
    ;;
  stop)
    on_all_workers "pkill -TERM -f 'python3 train.py' || true"
    ;;
  *)
    usage
    ;;
esac
