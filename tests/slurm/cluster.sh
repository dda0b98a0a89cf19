#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests marked `slurm`.
#
#   tests/slurm/cluster.sh up     install Debian's slurm + munge if missing, start munged,
#                                 slurmctld and slurmd, wait until the node is idle
#   tests/slurm/cluster.sh down   stop the three daemons by their pid files
#   tests/slurm/cluster.sh status print sinfo
#
# Needs root (the daemons run as root; munged as munge). The node gets this host's CPUs and
# memory and no GPUs, JobRequeue=1 and proctrack/linuxproc (no cgroups in a container).
# KillWait is 60 s: the time between the SIGTERM Slurm sends to a job's tasks (scancel, time
# limit, preemption) and the SIGKILL, which must cover a checkpoint of the run's head.
set -euo pipefail

STATE=${SF2DIST_SLURM_STATE:-/var/lib/sf2dist-slurm}
CONF_DIR=/etc/slurm
RUN=/run/sf2dist-slurm

log() { echo "cluster.sh: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    log "slurm is not installed and this is not root: cannot install it"; exit 3
  fi
  log "installing slurmctld slurmd slurm-client munge from Debian's packages"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  log "munged did not start (munge -n | unmunge fails)"; exit 3
}

write_conf() {
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" /var/log/slurm "$RUN"
  cat > "$CONF_DIR/slurm.conf" <<CONF
# written by sf2dist tests/slurm/cluster.sh
ClusterName=sf2dist-test
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
KillWait=60
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# A requeued job may start again after cred_expire seconds (default 120), and the scheduler
# looks at pending jobs every sched_interval seconds (default 60): both short for the tests.
AuthInfo=cred_expire=5
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

wait_idle() {
  local host state
  host=$(hostname -s)
  for _ in $(seq 150); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case "$state" in
      idle|mixed|allocated) log "node $host is $state"; return 0 ;;
    esac
    sleep 0.2
  done
  log "the node did not become idle (sinfo says '${state:-nothing}'); see /var/log/slurm/*.log"
  exit 3
}

up() {
  install_packages
  start_munge
  if [ -f "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; then
    wait_idle; return
  fi
  write_conf
  slurmctld -i
  slurmd
  wait_idle
}

stop_pidfile() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$file"
}

down() {
  stop_pidfile "$RUN/slurmd.pid"
  stop_pidfile "$RUN/slurmctld.pid"
  log "slurmctld and slurmd stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
