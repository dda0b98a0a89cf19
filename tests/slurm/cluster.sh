#!/usr/bin/env bash
# A real Slurm cluster on this machine, for the tests marked `slurm` (one node) and
# `multihost` (two nodes).
#
#   tests/slurm/cluster.sh up [--hosts N]  install Debian's slurm + munge if missing, start munged,
#                                          slurmctld and the slurmd of each node, wait until every
#                                          node is idle; writes what it started to $RUN/started
#   tests/slurm/cluster.sh down            stop what `up` started (daemons, then the hosts)
#   tests/slurm/cluster.sh node-up NODE    start NODE's slurmd again (after a test killed its host)
#   tests/slurm/cluster.sh status          print sinfo
#
# --hosts 1 (the default): one node, this machine under its own name, all in this namespace.
# --hosts N >= 2: N nodes sfnode0..sfnode<N-1>, each a host of its own (tests/hosts.sh: a network
# namespace with its own address, hostname and /etc/hosts, on a bridge), each running its own
# slurmd; slurmctld runs here and the nodes reach it over the bridge. What differs from one
# node: the nodes are named with their addresses (NodeAddr), each slurmd has its own spool
# directory, pid and log file (%n), the controller is named with the bridge's address, and
# SlurmdTimeout is short so that a host that dies is marked DOWN (and its job requeued) in
# seconds, not minutes. The shared file system is this machine's: a run directory or a log
# under /tmp is seen by every node, as on a cluster's shared storage.
#
# Needs root (the daemons run as root; munged as munge). Each node gets this machine's CPUs and
# no GPUs, JobRequeue=1 and proctrack/linuxproc (no cgroups in a container).
# KillWait is 60 s: the time between the SIGTERM Slurm sends to a job's tasks (scancel, time
# limit, preemption) and the SIGKILL, which must cover a checkpoint of the run's head.
set -euo pipefail

STATE=${SF2DIST_SLURM_STATE:-/var/lib/sf2dist-slurm}
CONF_DIR=/etc/slurm
RUN=/run/sf2dist-slurm
HOSTS_SH="$(cd "$(dirname "$0")/.." && pwd)/hosts.sh"
PREFIX=sfnode
SUBNET=10.213.7

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
  started munged
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  log "munged did not start (munge -n | unmunge fails)"; exit 3
}

write_conf() {
  local hosts=$1 host cpus mem_mb ctld nodes i
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 / hosts ))
  if [ "$hosts" = 1 ]; then
    ctld=$host
    nodes="NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    NODE_NAMES=$host
  else
    ctld="$host($SUBNET.254)"
    nodes="NodeName=DEFAULT CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    NODE_NAMES=""
    for i in $(seq 0 $((hosts - 1))); do
      nodes+=$'\n'"NodeName=$PREFIX$i NodeAddr=$SUBNET.$((i + 1))"
      NODE_NAMES+="${NODE_NAMES:+,}$PREFIX$i"
    done
  fi
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" /var/log/slurm "$RUN"
  cat > "$CONF_DIR/slurm.conf" <<CONF
# written by sf2dist tests/slurm/cluster.sh
ClusterName=sf2dist-test
SlurmctldHost=$ctld
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
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# A node whose slurmd stops answering is DOWN after this many seconds (default 300); its jobs
# end NODE_FAIL and are requeued (JobRequeue=1). Short, so the host-loss tests end in seconds.
SlurmdTimeout=15
# A requeued job may start again after cred_expire seconds (default 120), and the scheduler
# looks at pending jobs every sched_interval seconds (default 60): both short for the tests.
AuthInfo=cred_expire=5
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
$nodes
PartitionName=debug Nodes=$NODE_NAMES Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

wait_idle() {
  local want=$1 states idle
  for _ in $(seq 150); do
    states=$(sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    idle=$(echo "$states" | tr ' ' '\n' | grep -cE '=(idle|mixed|allocated)$' || true)
    if [ "$idle" -ge "$want" ]; then log "nodes up: $states"; return 0; fi
    sleep 0.2
  done
  log "not every node became idle (sinfo says '${states:-nothing}'); see /var/log/slurm/*.log"
  exit 3
}

started() { echo "$1" >> "$RUN/started"; }

up() {
  local hosts=1 i
  while [ $# -gt 0 ]; do
    case "$1" in
      --hosts) hosts=${2:?--hosts N}; shift 2 ;;
      *) echo "cluster.sh up: unknown option $1" >&2; exit 2 ;;
    esac
  done
  install_packages
  mkdir -p "$RUN"
  if [ -f "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; then
    log "a cluster is already running (not started again; 'down' leaves it running unless this script started it)"
    wait_idle "$hosts"; return
  fi
  start_munge
  if [ "$hosts" -gt 1 ]; then
    bash "$HOSTS_SH" up "$PREFIX" "$hosts" "$SUBNET" || { log "cannot make $hosts hosts (network namespaces)"; exit 3; }
    started hosts
  fi
  write_conf "$hosts"
  slurmctld -i
  started slurmctld
  if [ "$hosts" = 1 ]; then
    mkdir -p "$STATE/d/$(hostname -s)"
    slurmd
  else
    for i in $(seq 0 $((hosts - 1))); do
      mkdir -p "$STATE/d/$PREFIX$i"
      bash "$HOSTS_SH" exec "$PREFIX$i" slurmd
    done
  fi
  started slurmd
  wait_idle "$hosts"
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

# Only what `up` started (listed in $RUN/started): a cluster found running is left running.
down() {
  local what
  what=$(cat "$RUN/started" 2>/dev/null || true)
  if [ -z "$what" ]; then log "nothing to stop: this script started no daemon"; return; fi
  if echo "$what" | grep -qx slurmd; then
    for file in "$RUN"/slurmd*.pid; do stop_pidfile "$file"; done
  fi
  if echo "$what" | grep -qx slurmctld; then stop_pidfile "$RUN/slurmctld.pid"; fi
  if echo "$what" | grep -qx munged; then
    pkill -x munged 2>/dev/null || true
  fi
  if echo "$what" | grep -qx hosts; then bash "$HOSTS_SH" down "$PREFIX"; fi
  rm -f "$RUN/started"
  log "stopped: $(echo $what)"
}

# A host of a multi-host cluster that lost its processes or its network (a test killed them or cut
# its cable) gets a fresh slurmd; ReturnToService=2 returns the node to service when it registers.
node_up() {
  local node=$1
  stop_pidfile "$RUN/slurmd-$node.pid"
  mkdir -p "$STATE/d/$node"
  bash "$HOSTS_SH" exec "$node" slurmd
  for _ in $(seq 100); do
    case "$(sinfo -h -n "$node" -o %T 2>/dev/null)" in idle|mixed|allocated) return 0 ;; esac
    sleep 0.2
  done
  log "$node did not come back (sinfo: $(sinfo -h -n "$node" -o %T))"; exit 3
}

case "${1:-}" in
  up) shift; up "$@" ;;
  node-up) node_up "${2:?node-up NODE}" ;;
  down) down ;;
  status) sinfo ;;
  *) echo "usage: $0 up [--hosts N] | down | node-up NODE | status" >&2; exit 2 ;;
esac
