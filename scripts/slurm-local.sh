#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying `flopmatch study --launcher slurm` on a
# workstation and for the test that runs a study through a real SLURM.
#
#   sudo scripts/slurm-local.sh start [DIR]   # start munged, slurmctld, slurmd; state, logs and slurm.conf in DIR
#   sudo scripts/slurm-local.sh stop  [DIR]   # stop them (by the pids in DIR) and cancel what is left
#   scripts/slurm-local.sh status [DIR]       # sinfo + squeue
#
# DIR defaults to /tmp/flopmatch-slurm. After `start`, point the SLURM commands (and flopmatch) at it:
#   export SLURM_CONF=DIR/slurm.conf
# Needs root (slurmd runs jobs as their users) and Debian's slurm-wlm and munge packages
# (`apt-get install -y slurm-wlm munge`; `start` installs them when missing and it can). The cluster
# has one partition, `local`, with this machine's CPUs and memory (and GPUs found by nvidia-smi).
# Ports: SLURMCTLD_PORT / SLURMD_PORT (default 6817 / 6818; the test picks free ones).
# No accounting daemon (slurmdbd): `sacct` does not work here, `squeue` does; flopmatch needs only squeue.
set -euo pipefail
cmd=${1:-}
dir=$(realpath -m "${2:-/tmp/flopmatch-slurm}")
conf="$dir/slurm.conf"

die() { echo "slurm-local: $*" >&2; exit 2; }

stop_pid() {  # stop_pid FILE: TERM the process named in FILE, KILL it after 10 s
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

case "$cmd" in
start)
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their users); try: sudo $0 start $dir"
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and apt-get is not available"
    echo "slurm-local: installing slurm-wlm and munge"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; } \
      || die "could not install slurm-wlm and munge: run apt-get install -y slurm-wlm munge"
  fi
  if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    die "a cluster already runs from $dir (slurmctld pid $(cat "$dir/slurmctld.pid")); stop it first: $0 stop $dir"
  fi
  mkdir -p "$dir"/{state,spool,log}
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # leave 10% to the system
  gres="" gresconf=""
  if command -v nvidia-smi >/dev/null && ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [ "$ngpu" -gt 0 ]; then
    gres="Gres=gpu:$ngpu"
    gresconf="GresTypes=gpu"
    last=$((ngpu - 1))
    echo "NodeName=$host Name=gpu File=/dev/nvidia[0-$last]" > "$dir/gres.conf"
  fi
  # munge: a private daemon and socket, so a system munged (if any) is left alone. Its folder is under /tmp,
  # not DIR: munged runs as the munge user and refuses a socket or log it cannot reach through every parent
  # directory (DIR may sit in a root-only folder such as pytest's).
  mdir=$(mktemp -d /tmp/flopmatch-munge.XXXXXX)
  echo "$mdir" > "$dir/munge.path"
  chown munge:munge "$mdir" && chmod 755 "$mdir"
  runuser -u munge -- /usr/sbin/munged --socket="$mdir/munge.sock" --pid-file="$mdir/munged.pid" \
    --log-file="$mdir/munged.log" --seed-file="$mdir/munged.seed" \
    || die "munged did not start (see $mdir/munged.log)"
  cat > "$conf" <<EOF
# Written by flopmatch scripts/slurm-local.sh: a one-node cluster on $host.
ClusterName=flopmatch-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: also how long a requeued job (preempted or timed out) waits before it may start again; SLURM's
# default 120 s is for big clusters, 10 s is plenty on one machine (SLURM_CRED_EXPIRE to change it)
AuthInfo=socket=$mdir/munge.sock,cred_expire=${SLURM_CRED_EXPIRE:-10}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobRequeue=1
# preemption by partition priority: with the one partition nothing is ever preempted; tests/test_slurm.py adds a
# low-priority partition with PreemptMode=CANCEL and a high-priority one (scontrol create) to preempt a job for real
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MinJobAge=300
KillWait=30
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
$gresconf
DefMemPerCPU=$((mem_mb / cpus))
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb $gres State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$conf"
  /usr/sbin/slurmctld -i -f "$conf" || die "slurmctld did not start (see $dir/log/slurmctld.log)"
  /usr/sbin/slurmd -f "$conf" || die "slurmd did not start (see $dir/log/slurmd.log)"
  for _ in $(seq 100); do
    if sinfo -h -o %t 2>/dev/null | grep -q -E '^(idle|mix|alloc)'; then
      echo "slurm-local: cluster up in $dir ($cpus CPUs, ${mem_mb} MB${gres:+, $gres}); partition 'local'"
      echo "export SLURM_CONF=$conf"
      exit 0
    fi
    sleep 0.2
  done
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sinfo -h -o %t 2>/dev/null | grep -q -E '^(idle|mix|alloc)' || die "the node did not come up; see $dir/log/"
  echo "slurm-local: cluster up in $dir; export SLURM_CONF=$conf"
  ;;
stop)
  if [ -f "$conf" ] && [ -f "$dir/slurmctld.pid" ]; then
    SLURM_CONF="$conf" scancel --user="$(id -un)" >/dev/null 2>&1 || true
  fi
  stop_pid "$dir/slurmd.pid"
  stop_pid "$dir/slurmctld.pid"
  if [ -f "$dir/munge.path" ]; then
    mdir=$(cat "$dir/munge.path")
    stop_pid "$mdir/munged.pid"
    case "$mdir" in /tmp/flopmatch-munge.*) rm -rf "$mdir" ;; esac
    rm -f "$dir/munge.path"
  fi
  echo "slurm-local: stopped ($dir)"
  ;;
status)
  [ -f "$conf" ] || die "no cluster in $dir (start one: $0 start $dir)"
  SLURM_CONF="$conf" sinfo
  SLURM_CONF="$conf" squeue
  ;;
*)
  die "usage: $0 start|stop|status [DIR]"
  ;;
esac
