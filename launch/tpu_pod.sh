#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: one process per host, all running the same command.
#
#   REPO_URL=https://github.com/ORG/lsd.git COMMIT=<sha or tag> \
#   TPU_NAME=lsd-v5e16 ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 \
#   RUNTIME_VERSION=v2-alpha-tpuv5-lite WORKDIR=/mnt/shared/runs/sbd_base \
#   launch/tpu_pod.sh [--dry-run] CONFIG[:ARG] [--config.field=value ...]
#
# 1. Slice: reuses the queued resource TPU_NAME when it is ACTIVE, else queues it (gcloud compute
#    tpus queued-resources create; SPOT=1 for spot capacity) and waits until it is ACTIVE. One that
#    was preempted (SUSPENDED) or FAILED is deleted and queued again.
# 2. Install, once per COMMIT: every host clones REPO_URL into ~/lsd, checks out COMMIT and
#    pip-installs '.[tpu,gcs]' into ~/lsd/.venv; skipped on hosts whose ~/lsd/.installed names COMMIT.
# 3. Train: every host starts `lsd train --distributed` under nohup (log: ~/lsd_logs/RUN.HOST.log)
#    and the script returns; a host where this run (RUN, default: WORKDIR's name) is still going
#    is left alone.
# Rerun the same command after a preemption: the slice is queued again, the install skipped, and
# training resumes from the latest checkpoint in WORKDIR (SIGTERM makes lsd save one and exit).
# WORKDIR and the data must be storage every host reaches at the same path: a gs:// URL (read and
# written through etils.epath and gcsfs, see docs/scale.md "Remote storage") or a shared mount
# (Filestore, gcsfuse). Check the fit first: lsd compile --config CONFIG --topology v5e-16.
# --dry-run (or DRY_RUN=1): query the slice's state, print every command that would change
# something, run none of them.
set -euo pipefail
DRY_RUN=${DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
CONFIG=${1:?usage: launch/tpu_pod.sh [--dry-run] CONFIG[:ARG] [--config.field=value ...]}
shift
: "${REPO_URL:?set REPO_URL (the git URL every host clones)}"
: "${COMMIT:?set COMMIT (the commit or tag to install: runs must be reproducible)}"
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs:// or a shared mount)}"
: "${ACCELERATOR_TYPE:=v5litepod-16}" "${RUNTIME_VERSION:=v2-alpha-tpuv5-lite}"
RUN=${RUN:-$(basename "$WORKDIR")}
POLL_SECONDS=${POLL_SECONDS:-30}
WAIT_MINUTES=${WAIT_MINUTES:-120}
QR=(gcloud compute tpus queued-resources)
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all)

run() {  # a command that changes something: printed under --dry-run, else run
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

state() {  # the queued resource's state, or NOT_FOUND
  "${QR[@]}" describe "$TPU_NAME" --zone "$ZONE" --format='value(state.state)' 2>/dev/null ||
    echo NOT_FOUND
}

# ---------------------------------------------------------------- 1. slice
current=$(state)
echo "tpu_pod.sh: queued resource $TPU_NAME: $current" >&2
if [ "$current" = SUSPENDED ] || [ "$current" = FAILED ]; then
  run "${QR[@]}" delete "$TPU_NAME" --zone "$ZONE" --force --quiet
  current=NOT_FOUND
fi
if [ "$current" = NOT_FOUND ]; then
  spot=()
  [ "${SPOT:-0}" = 1 ] && spot=(--spot)
  run "${QR[@]}" create "$TPU_NAME" --node-id "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" "${spot[@]}"
fi
if [ "$DRY_RUN" != 1 ]; then
  deadline=$((SECONDS + WAIT_MINUTES * 60))
  while [ "$current" != ACTIVE ]; do
    if [ $SECONDS -ge $deadline ]; then
      echo "tpu_pod.sh: $TPU_NAME is not ACTIVE after $WAIT_MINUTES min ($current)" >&2
      exit 1
    fi
    sleep "$POLL_SECONDS"
    current=$(state)
    echo "tpu_pod.sh: queued resource $TPU_NAME: $current" >&2
  done
fi

# ---------------------------------------------------------------- 2. install (once per COMMIT)
q() { printf '%q' "$1"; }
install="set -e
if [ \"\$(cat ~/lsd/.installed 2>/dev/null)\" = $(q "$COMMIT") ]; then
  echo \"lsd $(q "$COMMIT") already installed on \$(hostname)\"; exit 0
fi
[ -d ~/lsd/.git ] || git clone --quiet $(q "$REPO_URL") ~/lsd
cd ~/lsd && git fetch --quiet origin && git checkout --quiet --detach $(q "$COMMIT")
python3 -m venv .venv && .venv/bin/pip install --quiet -e '.[tpu,gcs]'
echo $(q "$COMMIT") > .installed"
run "${SSH[@]}" --command "$install"

# ---------------------------------------------------------------- 3. train (nohup, per-host logs)
train_args=$(printf '%q ' --config "$CONFIG" --workdir "$WORKDIR" "$@" | sed 's/ $//')
start="set -e
cd ~/lsd && mkdir -p ~/lsd_logs
log=~/lsd_logs/$(q "$RUN").\$(hostname).log pid=~/lsd_logs/$(q "$RUN").\$(hostname).pid
if [ -f \"\$pid\" ] && kill -0 \"\$(cat \"\$pid\")\" 2>/dev/null; then
  echo \"$(q "$RUN") is still running on \$(hostname): left alone\"; exit 0
fi
nohup .venv/bin/lsd train --distributed $train_args >> \"\$log\" 2>&1 < /dev/null &
echo \$! > \"\$pid\"
echo \"started on \$(hostname): \$log\""
run "${SSH[@]}" --command "$start"
