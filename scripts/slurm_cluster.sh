#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on this machine, for the tests marked `slurm` and for trying the
# README's "Running on SLURM" commands:
#
#   sudo scripts/slurm_cluster.sh start    # installs slurm-wlm + munge if missing, starts munged, slurmctld, slurmd
#   scripts/slurm_cluster.sh status        # exit 0 when the node takes jobs
#   sudo scripts/slurm_cluster.sh stop     # stops the daemons it started (by their pid files)
#
# Needs root and Debian/Ubuntu's packages (slurm-wlm 22.05 on Debian 12). One node named after this host,
# with its CPUs and a little less memory than it has, in one default partition "debug"; no accounting
# database (no sacct). The node also declares MLPLAB_SLURM_GPUS (default 2) fake GPUs: character devices
# that clone /dev/null, so that jobs asking for GPUs are scheduled and each task's CUDA_VISIBLE_DEVICES
# shows what SLURM gave it (nothing can compute on them). It writes /etc/slurm/slurm.conf and gres.conf and
# refuses to touch ones it did not write. Idempotent: start on a running cluster only checks it.
set -euo pipefail

STATE=/var/lib/mlplab-slurm                 # spool dirs, logs, pid files, fake GPU devices
CONF_DIR=/etc/slurm
MARK="# written by mlplab scripts/slurm_cluster.sh"
GPUS=${MLPLAB_SLURM_GPUS:-2}
NODE=$(hostname -s)

die() { echo "error: $*" >&2; exit 1; }

is_running() {  # is_running <pid file>: the process it names is alive
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {  # idle, mixed, allocated, down*, drained, ... ("" when slurmctld does not answer)
  sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1 || true
}

status() {
  local state
  state=$(node_state)
  case "$state" in
    idle|mixed|allocated|completing) echo "slurm: node $NODE $state"; return 0 ;;
    "") echo "slurm: not running (slurmctld does not answer)"; return 1 ;;
    *) echo "slurm: node $NODE $state"; return 1 ;;
  esac
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are missing and there is no apt-get to install slurm-wlm and munge"
  echo "installing slurm-wlm and munge ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
}

write_config() {
  for f in "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"; do
    if [ -e "$f" ] && ! grep -qF "$MARK" "$f"; then
      die "$f exists and was not written by this script: this machine has a SLURM of its own; use that"
    fi
  done
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$STATE/log"
  local cpus mem gres=""
  cpus=$(nproc --all)
  mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # MiB; 10% left to the OS and the daemons
  if [ "$GPUS" -gt 0 ]; then
    gres="Gres=gpu:$GPUS"
    for ((i = 0; i < GPUS; i++)); do  # 1,3 is /dev/null's device number
      [ -c "$STATE/gpu$i" ] || mknod -m 666 "$STATE/gpu$i" c 1 3 || die "cannot create fake GPU device $STATE/gpu$i (mknod); set MLPLAB_SLURM_GPUS=0"
    done
    cat > "$CONF_DIR/gres.conf" <<EOF
$MARK
NodeName=$NODE Name=gpu File=$STATE/gpu[0-$((GPUS - 1))]
EOF
  else
    rm -f "$CONF_DIR/gres.conf"
  fi
  cat > "$CONF_DIR/slurm.conf" <<EOF
$MARK
ClusterName=mlplab
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (SLURM's default: 120)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# no cgroups in a container: processes are tracked through their parents, tasks are not bound to cores
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SchedulerType=sched/backfill
# the main scheduling pass every second (SLURM's default: 60 s): it is the pass that starts a requeued job once
# its cred_expire wait is over, which otherwise waited up to a minute more
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
# a job without --mem gets its cores' share of the memory, not the whole node (which would run jobs one at a time)
DefMemPerCPU=$((mem / cpus))
InactiveLimit=0
MinJobAge=300
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $gres State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (the munge package creates it; reinstall munge)"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key
  chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --force || die "munged did not start"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged started but munge -n | unmunge fails"
}

start() {
  [ "$(id -u)" = 0 ] || die "starting the test cluster needs root (sudo $0 start)"
  if status >/dev/null 2>&1; then status; return 0; fi
  install_packages
  write_config
  start_munge
  is_running "$STATE/slurmctld.pid" || slurmctld || die "slurmctld did not start: see $STATE/log/slurmctld.log"
  is_running "$STATE/slurmd.pid" || slurmd || die "slurmd did not start: see $STATE/log/slurmd.log"
  local state=""
  for _ in $(seq 150); do
    state=$(node_state)
    case "$state" in
      idle|mixed|allocated) status; return 0 ;;
      down*|drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;  # left down by an earlier run
    esac
    sleep 0.2
  done
  die "node $NODE is '${state:-unknown}' 30 s after start: see $STATE/log/slurmctld.log and slurmd.log"
}

stop() {
  local name pid
  for name in slurmd slurmctld; do
    if is_running "$STATE/$name.pid"; then
      pid=$(cat "$STATE/$name.pid")
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  echo "slurm: stopped (munged left running)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
