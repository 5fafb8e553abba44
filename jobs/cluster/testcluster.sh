#!/usr/bin/env bash
# A throw-away SLURM cluster on this one machine, for trying jobs/submit.py and for the tests.
#
#   sudo jobs/cluster/testcluster.sh start      # munge, MariaDB + slurmdbd, slurmctld, one slurmd per node
#   export SLURM_CONF=/tmp/a2b-slurm/etc/slurm.conf
#   python jobs/submit.py --partition gpu --nodes 2 --gpus-per-node 1 --cpus-per-task 1 --config ...
#   sudo jobs/cluster/testcluster.sh stop       # stops what start started (PID files); PURGE=1 wipes state
#   jobs/cluster/testcluster.sh status          # sinfo + squeue, exit 1 when the controller is down
#
# Needs root and Debian's Slurm 22.05 packages:
#   apt-get install -y --no-install-recommends slurm-wlm munge slurmdbd mariadb-server
#
# Nodes n1..nN all run on 127.0.0.1 (one slurmd each, Debian builds slurmd with multiple-slurmd
# support), partitions `gpu` (default) and `cpu`, fake GPUs (character devices cloned from /dev/null:
# Slurm accepts them as GRES, CUDA sees none, so training falls back to CPU and gloo). The node names
# do not resolve: add `127.0.0.1 n1 n2 n3 n4` to /etc/hosts or export A2B_MASTER_ADDR=127.0.0.1 before
# submitting. Accounting is real (MariaDB + slurmdbd) because submitit reads job states from sacct;
# without it a job that dies before writing its result leaves job.result() waiting forever.
#
# Settings (environment): A2B_SLURM_BASE (/tmp/a2b-slurm), A2B_SLURM_NODES (4), A2B_SLURM_CPUS (2 per
# node), A2B_SLURM_MEM_MB (2000 per node), A2B_SLURM_GPUS (4 per node). Ports 16917/16919/13406 and
# 17101.. keep it clear of other test clusters on the same machine. Processes run as root with no
# cgroups (proctrack/linuxproc): nothing limits a job's memory or CPUs.
set -euo pipefail

BASE=${A2B_SLURM_BASE:-/tmp/a2b-slurm}
NODES=${A2B_SLURM_NODES:-4}
CPUS=${A2B_SLURM_CPUS:-2}
MEM_MB=${A2B_SLURM_MEM_MB:-2000}
GPUS=${A2B_SLURM_GPUS:-4}
CTLD_PORT=16917; DBD_PORT=16919; DB_PORT=13406; SLURMD_PORT=17101

ETC=$BASE/etc; RUN=$BASE/run; LOG=$BASE/log; STATE=$BASE/state; MUNGE=$BASE/munge
MSOCK=$MUNGE/munge.socket.2; DBSOCK=$RUN/mariadb.sock
export SLURM_CONF=$ETC/slurm.conf

say() { echo "testcluster: $*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
retry() {   # retry SECONDS CMD...: run CMD until it succeeds or SECONDS pass
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { say "gave up waiting for: $*"; return 1; }
    sleep 0.2
  done
}
daemon() {  # daemon PIDFILE CMD...: start CMD detached (own session) unless PIDFILE names a live process
  local pidfile=$1 name; shift
  alive "$pidfile" && return 0
  name=$(basename "$pidfile" .pid)
  setsid "$@" > "$LOG/$name.out" 2>&1 < /dev/null &
  echo $! > "$pidfile"
}

write_configs() {
  local f
  cat > "$ETC/slurm.conf.new" <<EOF
# written by jobs/cluster/testcluster.sh: $NODES emulated nodes on 127.0.0.1
ClusterName=a2btest
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Slurm 22.05 needs munge. cred_expire is also how long a requeued job waits before it may start
# again (120 s by default); after that wait only a scheduler pass starts it: bf_interval/sched_interval.
AuthInfo=socket=$MSOCK,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld-self.pid
SlurmdPidFile=$RUN/slurmd-%n-self.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# slurmdbd authenticates slurmctld through this munge socket
AccountingStoragePass=$MSOCK
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
GresTypes=gpu
NodeName=n[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$SLURMD_PORT-$((SLURMD_PORT + NODES - 1)) CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=gpu Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=n[1-$NODES] MaxTime=INFINITE State=UP
EOF
  # Slurm drops GPUs without File=, and File= must be a character device.
  cat > "$ETC/gres.conf.new" <<EOF
AutoDetect=off
NodeName=n[1-$NODES] Name=gpu File=$BASE/gpu/nvidia[0-$((GPUS - 1))]
EOF
  cat > "$ETC/slurmdbd.conf.new" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MSOCK
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd-self.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=a2btest
StorageLoc=slurm_acct_db
EOF
  for f in slurm.conf gres.conf slurmdbd.conf; do
    if cmp -s "$ETC/$f.new" "$ETC/$f"; then rm "$ETC/$f.new"; continue; fi
    mv "$ETC/$f.new" "$ETC/$f"
    alive "$RUN/slurmctld.pid" && say "WARNING: $f changed while the cluster runs; stop it and start again"
  done
  chmod 600 "$ETC/slurmdbd.conf"
  echo "export SLURM_CONF=$SLURM_CONF" > "$BASE/env.sh"
}

start() {
  [ "$(id -u)" = 0 ] || { say "needs root (slurmd runs jobs as root here)"; exit 1; }
  local cmd
  for cmd in munged slurmctld slurmd slurmdbd mariadbd sinfo; do
    command -v "$cmd" >/dev/null || { say "$cmd not found; apt-get install -y --no-install-recommends slurm-wlm munge slurmdbd mariadb-server"; exit 1; }
  done
  local t0=$SECONDS i
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$BASE/gpu" "$MUNGE"
  chmod 755 "$BASE" "$MUNGE"   # munged refuses a socket folder others cannot traverse

  # Munge on a private socket, with its own key.
  [ -f "$MUNGE/munge.key" ] || { head -c 1024 /dev/urandom > "$MUNGE/munge.key"; chmod 400 "$MUNGE/munge.key"; }
  if ! alive "$MUNGE/munged.pid"; then
    rm -f "$MSOCK" "$MSOCK.lock"
    munged --socket="$MSOCK" --key-file="$MUNGE/munge.key" --pid-file="$MUNGE/munged.pid" \
           --log-file="$LOG/munged.log" --seed-file="$MUNGE/munged.seed"   # daemonizes itself
  fi
  retry 10 sh -c "munge -S '$MSOCK' -n | unmunge -S '$MSOCK'"

  for i in $(seq 0 $((GPUS - 1))); do
    [ -c "$BASE/gpu/nvidia$i" ] || { rm -f "$BASE/gpu/nvidia$i"; mknod "$BASE/gpu/nvidia$i" c 1 3; }
  done
  write_configs

  # Accounting: MariaDB, then slurmdbd, then register the cluster.
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mkdir -p "$STATE/mysql"
    mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" --skip-test-db \
        --auth-root-authentication-method=normal > "$LOG/mariadb-install.log" 2>&1
  fi
  daemon "$RUN/mariadbd.pid" mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$DBSOCK" \
      --port=$DB_PORT --bind-address=127.0.0.1 --log-error="$LOG/mariadbd.log" --skip-log-bin \
      --innodb-buffer-pool-size=32M
  retry 60 mariadb --no-defaults -S "$DBSOCK" -uroot -e 'select 1'
  mariadb --no-defaults -S "$DBSOCK" -uroot -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
      CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'a2btest';
      CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'a2btest';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  daemon "$RUN/slurmdbd.pid" slurmdbd -D   # reads slurmdbd.conf next to $SLURM_CONF
  retry 30 sacctmgr -n list cluster
  sacctmgr -n -P list cluster format=cluster | grep -qx a2btest || sacctmgr -i add cluster a2btest >/dev/null

  # Controller and one slurmd per emulated node.
  daemon "$RUN/slurmctld.pid" slurmctld -D -i
  local started=""
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$STATE/spool/n$i"
    if ! alive "$RUN/slurmd-n$i.pid"; then
      [ -n "$started" ] || started=$(date -d '-1 sec' +%Y-%m-%dT%H:%M:%S)
      daemon "$RUN/slurmd-n$i.pid" slurmd -D -N "n$i"
    fi
  done

  # Ready when every node is idle (or busy) and, after a restart, has registered again: a controller
  # recovering its state file reports the old nodes idle before their new slurmd has spoken.
  local deadline=$((SECONDS + 90)) states stale
  while :; do
    states=$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    case "$states" in *drain*|*down*|*inval*) scontrol update nodename="n[1-$NODES]" state=resume >/dev/null 2>&1 || true;; esac
    if [ -n "$states" ] && ! echo "$states" | grep -qvE '^((idle|mixed|allocated) )+$'; then
      stale=0
      [ -z "$started" ] || stale=$(timeout 10 scontrol -o show node 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' \
          | cut -d= -f2 | awk -v s="$started" '$1 == "None" || $1 < s' | wc -l)
      [ "$stale" = 0 ] && break
    fi
    if [ $SECONDS -ge $deadline ]; then
      say "nodes not ready ($states); see $LOG/slurmctld.log"; tail -5 "$LOG/slurmctld.log" >&2; exit 1
    fi
    sleep 0.25
  done
  sinfo -N -o '%N %T %c %m %G %P'
  say "ready in $((SECONDS - t0)) s; export SLURM_CONF=$SLURM_CONF"
}

stop_pids() {   # stop_pids GRACE_S PIDFILE...: TERM, wait up to GRACE_S, then KILL
  local grace=$1 f p pids=(); shift
  for f in "$@"; do
    [ -f "$f" ] || continue
    p=$(cat "$f"); rm -f "$f"
    kill -0 "$p" 2>/dev/null && kill -TERM "$p" && pids+=("$p")
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  local deadline=$((SECONDS + grace)) left
  while :; do
    left=(); for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
    [ ${#left[@]} -eq 0 ] && return 0
    [ $SECONDS -lt $deadline ] || break
    sleep 0.1
  done
  say "killing ${left[*]}"; kill -KILL "${left[@]}" 2>/dev/null || true
}

stop() {
  if alive "$RUN/slurmctld.pid"; then   # cancel jobs first so their processes end through Slurm
    local ids; ids=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${ids// /}" ]; then
      scancel $ids 2>/dev/null || true
      retry 15 sh -c '[ -z "$(squeue -h -o %i)" ]' || true
    fi
  fi
  stop_pids 15 "$RUN"/slurmd-n*.pid
  stop_pids 15 "$RUN/slurmctld.pid" "$RUN/slurmdbd.pid"
  stop_pids 30 "$RUN/mariadbd.pid" "$MUNGE/munged.pid"
  rm -f "$MSOCK" "$MSOCK.lock"
  [ "${PURGE:-0}" = 1 ] && rm -rf "$STATE" "$LOG"
  say "stopped"
}

status() {
  alive "$RUN/slurmctld.pid" && timeout 10 sinfo >/dev/null 2>&1 || { say "not running (SLURM_CONF=$SLURM_CONF)"; exit 1; }
  sinfo -N -o '%N %T %c %m %G %P'
  squeue
}

case "${1:-}" in
  start) start;;
  stop) stop;;
  status) status;;
  *) echo "usage: $0 start|stop|status   (see the comment at the top)" >&2; exit 2;;
esac
