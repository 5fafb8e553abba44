#!/usr/bin/env bash
# CI: install Debian's Slurm 22.05 (+ munge, MariaDB, slurmdbd), make the emulated node names n1..n4
# resolve, and start the throw-away cluster that tests/test_slurm.py submits to. Needs root.
# The tests find the cluster at its default place; stop it with: jobs/cluster/testcluster.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurm-wlm munge slurmdbd mariadb-server > /dev/null
fi
# TorchDistributedEnvironment makes the job's first node (n1) the rendezvous host.
grep -qE '^127\.0\.0\.1[[:space:]].*\bn1\b' /etc/hosts || echo '127.0.0.1 n1 n2 n3 n4' >> /etc/hosts
jobs/cluster/testcluster.sh start
