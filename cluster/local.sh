#!/usr/bin/env bash
# A multi-node Ray on this machine, to rehearse a cluster (and what tests/e2e/test_cluster.py uses):
#
#   cluster/local.sh up 3 [--cpus-per-node 1] [--state-dir DIR]   # a head + 2 workers: node_a, node_b, node_c
#   source "${RAYLIGN_HOME:-$HOME/.cache/raylign}/cluster/env.sh"  # RAY_ADDRESS, token auth for the ray CLI
#   ray job submit --working-dir . -- raylign train grpo resources.rollout_placement=node_c ...
#   cluster/local.sh status
#   cluster/local.sh down [--state-dir DIR]                         # stops exactly those processes, never `ray stop`
#
# Each node is its own `ray start` raylet with free ports, its own temp dir, RAYLIGN_HOME and TMPDIR, a CPU
# share and a node resource; token authentication is on (a fresh token in DIR/auth_token). Same as
# `raylign cluster up --nodes N` / `raylign cluster down`; the work is done by raylign/localcluster.py.
# PYTHON picks the interpreter (default: the one next to `raylign` on PATH, else python3).
set -euo pipefail
if [[ -z "${PYTHON:-}" ]]; then
  if command -v raylign >/dev/null 2>&1; then
    PYTHON="$(dirname "$(command -v raylign)")/python"
  else
    PYTHON=python3
  fi
fi
case "${1:-}" in
  up|down|status) exec "$PYTHON" -m raylign.localcluster "$@" ;;
  *) echo "usage: $0 up N [--cpus-per-node C] [--state-dir DIR] | down [--state-dir DIR] | status [--state-dir DIR]" >&2
     exit 2 ;;
esac
