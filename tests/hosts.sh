#!/usr/bin/env bash
# Hosts on this machine for the multi-host tests: each host is a network namespace with its own
# hostname file, joined to the others (and to this machine's own namespace) by a bridge, like
# the nodes of a cluster on one switch. Nothing leaves the machine: the addresses are a private
# /24 that exists only on that bridge.
#
#   tests/hosts.sh up PREFIX N SUBNET   namespaces PREFIX0..PREFIX<N-1> at SUBNET.1..N (SUBNET like
#                                       10.213.7), bridge PREFIX-br at SUBNET.254 in this namespace;
#                                       each host's /etc/hosts (/etc/netns/HOST/hosts) names them all
#   tests/hosts.sh down PREFIX          kills every process left in those namespaces, removes them,
#                                       their veths, the bridge and /etc/netns/PREFIX*
#   tests/hosts.sh exec HOST CMD...     runs CMD on HOST: its network namespace, its /etc/hosts and
#                                       its hostname (mount and UTS namespaces of its own)
#   tests/hosts.sh cut|join HOST        unplugs or plugs back HOST's cable (its veth on the bridge)
#
# Needs root, iproute2 (`ip netns`), and nsenter and unshare from util-linux.
set -euo pipefail

log() { echo "hosts.sh: $*" >&2; }

up() {
  local prefix=$1 count=$2 subnet=$3 i host
  down "$prefix" 2>/dev/null || true
  ip link add "$prefix-br" type bridge
  ip addr add "$subnet.254/24" dev "$prefix-br"
  ip link set "$prefix-br" up
  local names="127.0.0.1 localhost
$subnet.254 $(hostname -s)"
  for i in $(seq 0 $((count - 1))); do names+=$'\n'"$subnet.$((i + 1)) $prefix$i"; done
  for i in $(seq 0 $((count - 1))); do
    host=$prefix$i
    ip netns add "$host"
    ip link add "$prefix-v$i" type veth peer name eth0 netns "$host"
    ip link set "$prefix-v$i" master "$prefix-br" up
    ip -n "$host" addr add "$subnet.$((i + 1))/24" dev eth0
    ip -n "$host" link set eth0 up
    ip -n "$host" link set lo up
    mkdir -p "/etc/netns/$host"
    echo "$names" > "/etc/netns/$host/hosts"
  done
  log "hosts ${prefix}0..$prefix$((count - 1)) up on $subnet.0/24 (bridge $prefix-br at $subnet.254)"
}

down() {
  local prefix=$1 host pids
  for host in $(ip netns list | awk '{print $1}' | grep -E "^$prefix[0-9]+$" || true); do
    pids=$(ip netns pids "$host" || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    ip netns delete "$host"
    rm -rf "/etc/netns/$host"
  done
  ip link delete "$prefix-br" 2>/dev/null || true
  # a veth's root end goes with its peer's namespace; left-overs of a half-made `up` do not
  for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^$prefix-v[0-9]+$" || true); do
    ip link delete "$link" 2>/dev/null || true
  done
}

host_exec() {
  local host=$1; shift
  # Only the network namespace is the host's (nsenter, not `ip netns exec`, which would mount a
  # sysfs of its own and hide the cgroup file systems slurmd needs); a private mount namespace
  # binds the host's hosts file over /etc/hosts, and a UTS namespace gives it its hostname.
  exec nsenter --net="/run/netns/$host" unshare --mount --uts --propagation private \
    sh -c 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$0" && exec "$@"' "$host" "$@"
}

link() {
  local state=$1 host=$2 prefix index
  prefix=$(echo "$host" | sed 's/[0-9]*$//')
  index=${host#"$prefix"}
  ip link set "$prefix-v$index" "$state"
}

case "${1:-}" in
  up) up "${2:?PREFIX}" "${3:?N}" "${4:?SUBNET}" ;;
  down) down "${2:?PREFIX}"; log "hosts $2* removed" ;;
  exec) shift; host_exec "$@" ;;
  cut) link down "${2:?HOST}" ;;
  join) link up "${2:?HOST}" ;;
  *) echo "usage: $0 up PREFIX N SUBNET | down PREFIX | exec HOST CMD... | cut HOST | join HOST" >&2; exit 2 ;;
esac
