#!/usr/bin/env bash
# local_cluster.sh - a real two-node SLURM cluster on this one machine, for the tests of launch/slurm/.
#
# Two simulated hosts: network namespaces dsv3-n1 and dsv3-n2 joined by a veth pair, each with its own
# address (10.99.17.1 / .2), hostname and /etc/hosts, so a job on two nodes really has two hosts that
# must find each other over the network. Debian's slurm 22.05: slurmctld and one slurmd in n1, one
# slurmd in n2; munged in the root namespace (its socket is a file, reachable from every namespace).
#
# Usage (root):
#   local_cluster.sh up          install slurm+munge with apt if missing, (re)create the hosts, start the
#                                daemons, wait until both nodes are idle
#   local_cluster.sh down        stop everything `up` started, delete the namespaces (idempotent)
#   local_cluster.sh exec CMD..  run CMD on n1, where the controller is reachable, e.g.
#                                `local_cluster.sh exec sbatch --nodes=2 launch/slurm/pretrain.sbatch ...`
# Env: DSV3_SLURM_DIR (config, state, logs; default /tmp/dsv3-slurm), DSV3_SLURM_TIMEOUT (s, default 60).
#
# Safety: the hosts have no default route, and while they exist the root namespace routes their subnet
# to `unreachable`, so no test traffic can follow the default route off this machine.
set -euo pipefail

DIR=${DSV3_SLURM_DIR:-/tmp/dsv3-slurm}
TIMEOUT=${DSV3_SLURM_TIMEOUT:-60}
SUBNET=10.99.17
NODES=(dsv3-n1 dsv3-n2)
export SLURM_CONF=$DIR/slurm.conf

log() { echo "[local_cluster] $*" >&2; }
die() {
  log "ERROR: $*"
  for f in "$DIR"/log/*.log; do [ -f "$f" ] && { log "--- tail $f"; tail -n 15 "$f" >&2; }; done
  exit 1
}

on_host() { # INDEX(0|1) CMD...: nsenter, not `ip netns exec`, which remounts /sys and hides the cgroups
  local n=${NODES[$1]}; shift
  nsenter --net="/run/netns/$n" -- unshare --mount --uts --propagation private -- sh -c \
    'mount --bind "/etc/netns/$0/hosts" /etc/hosts && mount --bind "/etc/netns/$0/resolv.conf" /etc/resolv.conf &&
     hostname "$0" && exec "$@"' "$n" "$@"
}

install_if_missing() {
  local pkgs="slurmctld slurmd slurm-client munge iproute2" t0=$SECONDS
  local c missing=0
  for c in slurmctld slurmd sbatch munged ip; do command -v "$c" >/dev/null || missing=1; done
  [ $missing = 1 ] || return 0
  log "installing $pkgs (apt)"
  # No init system here, and the daemons need our config first: keep dpkg from starting them.
  local policy=0
  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy=1; }
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1; apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; } \
    || { [ $policy = 0 ] || rm -f /usr/sbin/policy-rc.d; die "apt-get install $pkgs failed"; }
  [ $policy = 0 ] || rm -f /usr/sbin/policy-rc.d
  log "installed in $((SECONDS - t0)) s"
}

pid_of() { # PIDFILE COMM: the pid if that process is alive and is COMM (pid files can be stale)
  local p; p=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] && echo "$p"
}

stop_pids() { # PID...: TERM all at once (each daemon takes ~2 s to exit), wait up to 10 s, then KILL
  [ $# -gt 0 ] || return 0
  kill "$@" 2>/dev/null || true
  local i p alive
  for i in $(seq 100); do
    alive=0; for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 1 ] || return 0
    sleep 0.1
  done
  kill -9 "$@" 2>/dev/null || true
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # someone's munged already serves
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; mungekey -c -f -k /etc/munge/munge.key; }
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
  touch "$DIR/munged.ours"  # `down` stops only a munged that we started
  local i; for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munge round trip failed"
}

hosts_up() {
  local i n existing
  existing=$(ip route show "$SUBNET.0/24")
  [ -z "$existing" ] || die "$SUBNET.0/24 is already routed here ($existing): not reusing it"
  ip route add unreachable "$SUBNET.0/24"  # the guard described in the header, set before any address
  for i in 0 1; do
    n=${NODES[$i]}
    ip netns add "$n"
    ip -n "$n" link set lo up
    mkdir -p "/etc/netns/$n"
    printf '127.0.0.1 localhost\n%s.1 %s\n%s.2 %s\n' "$SUBNET" "${NODES[0]}" "$SUBNET" "${NODES[1]}" > "/etc/netns/$n/hosts"
    printf 'options timeout:1 attempts:1\n' > "/etc/netns/$n/resolv.conf"  # no DNS inside
  done
  ip link add eth0 netns "${NODES[0]}" type veth peer name eth0 netns "${NODES[1]}"
  for i in 0 1; do
    ip -n "${NODES[$i]}" addr add "$SUBNET.$((i + 1))/24" dev eth0
    ip -n "${NODES[$i]}" link set eth0 up
  done
}

hosts_down() { # kills whatever still runs in the namespaces: only what `up` started can be in there
  local n p i
  for n in "${NODES[@]}"; do
    if [ -e "/run/netns/$n" ]; then
      for p in $(ip netns pids "$n"); do kill "$p" 2>/dev/null || true; done
      for i in $(seq 50); do [ -z "$(ip netns pids "$n")" ] && break; sleep 0.1; done
      for p in $(ip netns pids "$n"); do kill -9 "$p" 2>/dev/null || true; done
      for i in $(seq 50); do [ -z "$(ip netns pids "$n")" ] && break; sleep 0.1; done
      ip netns del "$n"  # takes the veth pair with it
    fi
    rm -rf "/etc/netns/$n"
  done
  rmdir /etc/netns 2>/dev/null || true
  if ip route show "$SUBNET.0/24" | grep -q '^unreachable'; then ip route del unreachable "$SUBNET.0/24"; fi
}

write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.4)}' /proc/meminfo)  # both nodes share this RAM
  cat > "$SLURM_CONF" <<EOF
# generated by tests/slurm/local_cluster.sh
ClusterName=dsv3ci
SlurmctldHost=${NODES[0]}($SUBNET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MailProg=/bin/true
MpiDefault=none
# no cgroups: the test machine may not delegate them
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# start jobs at once instead of after the default batching delay
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=600
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=${NODES[0]} NodeAddr=$SUBNET.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=$SUBNET.2 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) states=""
  while [ $SECONDS -lt $deadline ]; do
    states=$(on_host 0 sinfo -h -N -o '%N %T' 2>/dev/null || true)
    [ "$(echo "$states" | grep -c ' idle$')" = 2 ] && return 0
    sleep 0.2
  done
  die "nodes not idle after ${TIMEOUT} s: $(echo $states)"
}

down() {
  local f p pids=()
  for f in "$DIR"/run/slurmd-*.pid; do p=$(pid_of "$f" slurmd) && pids+=("$p"); done
  p=$(pid_of "$DIR/run/slurmctld.pid" slurmctld) && pids+=("$p")
  if [ -e "$DIR/munged.ours" ]; then p=$(pid_of /run/munge/munged.pid munged) && pids+=("$p"); fi
  stop_pids "${pids[@]}"
  hosts_down
  # only what `up` made: DSV3_SLURM_DIR may name a directory that holds other things
  rm -rf "$DIR"/state "$DIR"/log "$DIR"/run "$DIR"/munged.ours "$SLURM_CONF"
  rmdir "$DIR" 2>/dev/null || true
}

up() {
  local t0=$SECONDS i
  install_if_missing
  down  # a fresh cluster every time: no state or daemons from an earlier run
  mkdir -p "$DIR"/state/ctld "$DIR"/log "$DIR"/run
  for i in "${NODES[@]}"; do mkdir -p "$DIR/state/$i"; done  # %n spool dirs are not created by slurmd
  hosts_up
  start_munge
  write_conf
  on_host 0 slurmctld -f "$SLURM_CONF" || die "slurmctld did not start"
  for i in 0 1; do on_host "$i" slurmd -f "$SLURM_CONF" -N "${NODES[$i]}" || die "slurmd ${NODES[$i]} did not start"; done
  wait_idle
  log "up in $((SECONDS - t0)) s: ${NODES[*]} idle; SLURM_CONF=$SLURM_CONF"
}

[ "$(id -u)" = 0 ] || { echo "local_cluster.sh: needs root (apt, network namespaces)" >&2; exit 1; }
case "${1:-}" in
  up) trap 'rc=$?; [ $rc = 0 ] || down; exit $rc' EXIT; up ;;  # a failed start leaves nothing behind
  down) down; log "down" ;;
  exec) shift; on_host 0 "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | grep '^#' >&2; exit 2 ;;
esac
