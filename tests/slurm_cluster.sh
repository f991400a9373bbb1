#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for the tests and CI: Debian's slurm-wlm 22.05 + munge,
# one slurmctld and two slurmd "nodes" (n1, n2) on different ports, no systemd needed.
#
#   sudo tests/slurm_cluster.sh start    install the packages if missing, write /etc/slurm/slurm.conf,
#                                        start munged, slurmctld and both slurmd, wait until both nodes are
#                                        idle and a 2-node srun works. Idempotent: a running cluster with the
#                                        same config is left alone.
#   sudo tests/slurm_cluster.sh stop     stop the daemons this script started (by recorded PID), nothing else
#   tests/slurm_cluster.sh status        the recorded daemons and `sinfo -N`
#
# Environment: SLURM_CLUSTER_CPUS (CPUs declared per node, default 8: more than this machine has, so test
# jobs can overlap), SLURM_CLUSTER_TIMEOUT (seconds to wait for idle nodes, default 60).
# Logs: /var/log/ddptrain-slurm/{slurmctld,slurmd-n1,slurmd-n2,jobcomp}.log. Root only.
set -euo pipefail

CPUS=${SLURM_CLUSTER_CPUS:-8}
TIMEOUT=${SLURM_CLUSTER_TIMEOUT:-60}
RUN=/run/ddptrain-slurm
SPOOL=/var/spool/ddptrain-slurm
LOGS=/var/log/ddptrain-slurm
CONF=/etc/slurm/slurm.conf
NODES="n1 n2"
HOST=$(hostname -s)

log() { echo "[slurm_cluster] $*" >&2; }
fail() { log "error: $*"; exit 1; }

# A PID is ours if it is alive, not a zombie (PID 1 may reap late here) and runs the program we started.
is_running() {  # is_running PID NAME
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

install_packages() {
  local cmd missing=0
  for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || missing=1; done
  [ "$missing" = 0 ] && return
  command -v apt-get >/dev/null || fail "SLURM is not installed and there is no apt-get (install slurm-wlm and munge)"
  log "installing slurm-wlm and munge with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

config() {  # the slurm.conf this script wants, on stdout
  local mem
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  cat <<EOF
# Written by ddptrain's tests/slurm_cluster.sh: two slurmd "nodes" on one machine.
ClusterName=ddptrain-ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# A requeued job may start again only after the credential expires (default 120 s; 22.05 took 4 for
# the default, 5 works).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${LOGS}/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The nodes declare more CPUs than the machine has.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# Start jobs (requeued ones too) within a second instead of the default minute.
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
JobRequeue=1
# As on many clusters: one task that fails ends the step (the batch scripts opt out with srun --kill-on-bad-exit=0).
KillOnBadExit=1
# Jobs in "urgent" preempt jobs in "debug": those get SIGTERM, then GraceTime seconds, then are requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MinJobAge=3600
MailProg=/bin/true
StateSaveLocation=${SPOOL}/ctld
SlurmdSpoolDir=${SPOOL}/d-%n
SlurmctldPidFile=${RUN}/slurmctld.pid
SlurmdPidFile=${RUN}/slurmd-%n.pid
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd-%n.log
NodeName=n1 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=17001 CPUs=${CPUS} RealMemory=${mem} State=UNKNOWN
NodeName=n2 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=17002 CPUs=${CPUS} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=2
EOF
}

remember() {  # remember NAME PIDFILE: daemons write their pidfile a moment after they fork
  local i pid=""
  for i in $(seq 100); do
    pid=$(cat "$2" 2>/dev/null || true)
    is_running "$pid" "$1" && break
    sleep 0.1
  done
  is_running "$pid" "$1" || fail "$1 did not start (see $LOGS and $2)"
  echo "$1 $pid" >> "$RUN/pids"
}

running() {  # every daemon of this cluster alive?
  local name=slurmctld file=$RUN/slurmctld.pid n
  is_running "$(cat "$file" 2>/dev/null || true)" "$name" || return 1
  for n in $NODES; do is_running "$(cat "$RUN/slurmd-$n.pid" 2>/dev/null || true)" slurmd || return 1; done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return  # a munged is already serving
  install -d -o munge -g munge -m 0755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --force
  remember munged /run/munge/munged.pid
  local i
  for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  fail "munged does not answer (see /var/log/munge/munged.log)"
}

wait_until_idle() {
  local start=$SECONDS states
  while :; do
    states=$(sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | paste -sd' ' || true)
    [ "$states" = "n1=idle n2=idle" ] && return
    [ $((SECONDS - start)) -ge "$TIMEOUT" ] && fail "nodes not idle after ${TIMEOUT} s: '$states' (see $LOGS)"
    sleep 0.2
  done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  [ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and starts daemons)"
  install_packages
  mkdir -p "$RUN" "$SPOOL/ctld" "$LOGS" /etc/slurm
  local n
  for n in $NODES; do mkdir -p "$SPOOL/d-$n"; done
  # The node names must resolve: the batch scripts use them as rendezvous and master addresses.
  for n in $NODES; do getent hosts "$n" >/dev/null || echo "127.0.0.1 $n" >> /etc/hosts; done
  local wanted
  wanted=$(config)
  if running && [ "$wanted" = "$(cat "$CONF" 2>/dev/null)" ]; then
    log "already running"
  else
    [ -f "$RUN/pids" ] && stop
    for port in 6817 17001 17002; do
      port_in_use "$port" && fail "port $port is in use by a SLURM daemon this script did not start; stop it first"
    done
    touch "$RUN/pids"
    start_munge
    printf '%s\n' "$wanted" > "$CONF"
    rm -rf "${SPOOL:?}/ctld/"* "$RUN"/slurm*.pid  # no jobs or node states left over from an earlier cluster
    slurmctld || fail "slurmctld failed (see $LOGS/slurmctld.log)"
    remember slurmctld "$RUN/slurmctld.pid"
    for n in $NODES; do
      slurmd -N "$n" || fail "slurmd $n failed (see $LOGS/slurmd-$n.log)"
      remember slurmd "$RUN/slurmd-$n.pid"
    done
  fi
  wait_until_idle
  # End to end: a step on both nodes (munge, ports and name resolution all take part).
  timeout 60 srun --nodes=2 --ntasks=2 --time=1 --job-name=cluster-check true || fail "a 2-node srun failed"
  wait_until_idle
  log "up: $(sinfo -h -N -p debug -o '%N %T %c CPUs' | paste -sd',')"
}

stop() {
  [ -f "$RUN/pids" ] || { log "nothing to stop"; return 0; }
  local name pid i
  tac "$RUN/pids" | while read -r name pid; do
    is_running "$pid" "$name" || continue
    kill -TERM "$pid"
    for i in $(seq 150); do is_running "$pid" "$name" || break; sleep 0.1; done
    is_running "$pid" "$name" && kill -KILL "$pid"
    log "stopped $name ($pid)"
  done
  rm -f "$RUN/pids"
}

case "${1:-}" in
  start) start ;;
  stop) [ "$(id -u)" = 0 ] || fail "must run as root"; stop ;;
  status) cat "$RUN/pids" 2>/dev/null || true; sinfo -N ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
