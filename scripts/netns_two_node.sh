#!/usr/bin/env bash
# Two "hosts" on one Linux machine: two network namespaces joined by a veth pair, for real two-node
# runs of optsel (torchrun c10d rendezvous, or the deepspeed launcher with --no_ssh) without a cluster.
#
#   sudo bash scripts/netns_two_node.sh up                 # create optsel-n0 / optsel-n1 (idempotent)
#   sudo bash scripts/netns_two_node.sh run torchrun  configs/demo.yaml data.local=DIR output_dir=DIR ...
#   sudo bash scripts/netns_two_node.sh run deepspeed configs/demo.yaml data.local=DIR output_dir=DIR ...
#   sudo bash scripts/netns_two_node.sh status
#   sudo bash scripts/netns_two_node.sh down               # remove them (idempotent)
#
# Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2 (`ip`), util-linux (`unshare`, `mount`).
#
# What each "host" gets, as a separate machine would have it:
#   * its own network stack: namespace $OPTSEL_NS0 with $OPTSEL_VETH0 = $OPTSEL_ADDR0/$OPTSEL_PREFIXLEN,
#     namespace $OPTSEL_NS1 with $OPTSEL_VETH1 = $OPTSEL_ADDR1/$OPTSEL_PREFIXLEN, and lo, all up;
#   * its own hostname ($OPTSEL_HOST0 / $OPTSEL_HOST1, in a private UTS namespace) and an /etc/hosts
#     naming both hosts (`up` writes /etc/netns/<ns>/hosts, which `ip netns exec` binds over /etc/hosts).
#     torchrun's c10d rendezvous decides which node hosts the store by matching the endpoint against the
#     local hostname/addresses, and hands the workers the rank-0 node's hostname as MASTER_ADDR: both
#     only work when the two hosts have different names that resolve to their veth addresses;
#   * its own /dev/shm (a tmpfs mounted in the mount namespace that `ip netns exec` creates, gone when
#     the node's processes end). mosaicml-streaming names its shared memory /dev/shm/NNNNNN_<name> and
#     has each node's local leader pick the first free NNNNNN *before* a global barrier; two nodes that
#     share /dev/shm both pick 000000 and the second fails creating it (FileExistsError). There is no
#     setting in streaming that namespaces these names, so each node needs its own /dev/shm, as real
#     hosts have (OPTSEL_SHARED_SHM=1 keeps the shared one, to see that failure);
#   * its own TMPDIR (<workdir>/node<R>/tmp) and XDG_CACHE_HOME (<workdir>/node<R>/cache): streaming's
#     file locks (<tmp>/NNNNNN_*_filelock) live in the first, optsel's default streaming cache
#     ($XDG_CACHE_HOME/optsel/streaming/<host>/..., i.e. data.cache_dir) in the second, so each node has
#     its own working copy of the shards. Do not point data.cache_dir at one directory shared by both nodes.
# Shared by both, like a shared filesystem: the repository, the prepared shards (data.local) and the
# run directory (output_dir/run_name; only global rank 0 writes into it).
#
# `run LAUNCHER CONFIG [key=value ...]` starts node 0 and node 1 in their namespaces (from the current
# directory; the demo configs use paths relative to the repository root), each with
# $OPTSEL_NPROC_PER_NODE processes, streams their output prefixed with [node0]/[node1] (also kept in
# <workdir>/node<R>.log), waits for both, stops the other node when one fails, enforces
# $OPTSEL_RUN_TIMEOUT seconds overall, and reports both exit codes. Exit status: 0 when both nodes exit
# 0, else the first non-zero node exit code (124 on the overall timeout). The commands it runs are the
# ones of docs/launching.md:
#   torchrun:  python -m torch.distributed.run --nnodes 2 --nproc_per_node N --rdzv_backend c10d
#              --rdzv_endpoint $OPTSEL_HOST0:$OPTSEL_MASTER_PORT --rdzv_id ID -m optsel.launch.train ...
#   deepspeed: deepspeed --hostfile <workdir>/hostfile --no_ssh --num_nodes 2 --node_rank R --num_gpus N
#              --master_addr $OPTSEL_HOST0 --master_port $OPTSEL_MASTER_PORT --module optsel.launch.train ...
#              (the deepspeed launcher refuses --num_nodes 2 without a hostfile, even with --no_ssh)
#
# Settings (environment variables, defaults in brackets):
#   OPTSEL_NS0 [optsel-n0]  OPTSEL_NS1 [optsel-n1]          namespace names
#   OPTSEL_VETH0 [optsel-v0]  OPTSEL_VETH1 [optsel-v1]      veth ends (<= 15 characters)
#   OPTSEL_ADDR0 [10.231.0.1]  OPTSEL_ADDR1 [10.231.0.2]  OPTSEL_PREFIXLEN [24]
#   OPTSEL_HOST0 [$OPTSEL_NS0]  OPTSEL_HOST1 [$OPTSEL_NS1]  hostnames of the two hosts
#   OPTSEL_MASTER_PORT [29500]  OPTSEL_NPROC_PER_NODE [1]  OPTSEL_RUN_TIMEOUT [900]
#   OPTSEL_WORKDIR [a new /tmp/optsel-2node.XXXXXX]      logs, per-node TMPDIRs, the deepspeed hostfile
#   OPTSEL_PYTHON [<repo>/.venv/bin/python, else python3]
#   OPTSEL_SHARED_SHM [0]                                   1: keep the machine's /dev/shm (see above)
# In each node: GLOO_SOCKET_IFNAME / TP_SOCKET_IFNAME / NCCL_SOCKET_IFNAME = that node's veth,
# TMPDIR as above, OMP_NUM_THREADS [1] and TORCH_EXTENSIONS_DIR [~/.cache/optsel/torch_extensions]
# unless set.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/scripts/$(basename "${BASH_SOURCE[0]}")"
NS0=${OPTSEL_NS0:-optsel-n0}
NS1=${OPTSEL_NS1:-optsel-n1}
VETH0=${OPTSEL_VETH0:-optsel-v0}
VETH1=${OPTSEL_VETH1:-optsel-v1}
ADDR0=${OPTSEL_ADDR0:-10.231.0.1}
ADDR1=${OPTSEL_ADDR1:-10.231.0.2}
PREFIXLEN=${OPTSEL_PREFIXLEN:-24}
HOST0=${OPTSEL_HOST0:-$NS0}
HOST1=${OPTSEL_HOST1:-$NS1}
NOT_PERMITTED=77  # exit status of `up` when namespaces cannot be created here

die() { echo "netns_two_node: $*" >&2; exit 2; }
ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx -- "$1"; }

need_tools() {
  command -v ip >/dev/null || die "iproute2 is missing (apt-get install -y iproute2)"
  command -v unshare >/dev/null || die "unshare is missing (util-linux)"
}

cmd_up() {
  need_tools
  local err
  for ns in "$NS0" "$NS1"; do
    if ! ns_exists "$ns"; then
      if ! err=$(ip netns add "$ns" 2>&1); then
        echo "netns_two_node: network namespaces are not permitted here: 'ip netns add $ns' failed: $err" \
             "(needs root / CAP_SYS_ADMIN and CAP_NET_ADMIN)" >&2
        exit $NOT_PERMITTED
      fi
    fi
  done
  # the veth pair, one end in each namespace (recreated if only one end survived)
  if ! ip -n "$NS0" link show "$VETH0" >/dev/null 2>&1 || ! ip -n "$NS1" link show "$VETH1" >/dev/null 2>&1; then
    ip -n "$NS0" link del "$VETH0" >/dev/null 2>&1 || true
    ip -n "$NS1" link del "$VETH1" >/dev/null 2>&1 || true
    if ! err=$(ip link add "$VETH0" netns "$NS0" type veth peer name "$VETH1" netns "$NS1" 2>&1); then
      echo "netns_two_node: network namespaces are not permitted here: creating the veth pair failed: $err" >&2
      exit $NOT_PERMITTED
    fi
  fi
  ip -n "$NS0" addr replace "$ADDR0/$PREFIXLEN" dev "$VETH0"
  ip -n "$NS1" addr replace "$ADDR1/$PREFIXLEN" dev "$VETH1"
  for pair in "$NS0 $VETH0" "$NS1 $VETH1"; do
    set -- $pair
    ip -n "$1" link set lo up
    ip -n "$1" link set "$2" up
  done
  # /etc/netns/<ns>/hosts is bound over /etc/hosts by `ip netns exec`
  for ns in "$NS0" "$NS1"; do
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n%s\t%s\n' \
      "$ADDR0" "$HOST0" "$ADDR1" "$HOST1" > "/etc/netns/$ns/hosts"
  done
  # the link is up when each side reaches the other
  local ok=0
  for _ in $(seq 50); do
    if ip netns exec "$NS0" ping -c1 -W1 "$ADDR1" >/dev/null 2>&1 || ! command -v ping >/dev/null; then ok=1; break; fi
    sleep 0.1
  done
  [ "$ok" = 1 ] || die "$NS0 cannot reach $ADDR1 over $VETH0/$VETH1"
  echo "up: $NS0 ($HOST0, $VETH0 $ADDR0/$PREFIXLEN) <-> $NS1 ($HOST1, $VETH1 $ADDR1/$PREFIXLEN)"
}

kill_ns_procs() {  # kill_ns_procs NS SIGNAL: signal every process inside namespace NS (ours: we made it)
  local pids
  pids=$(ip netns pids "$1" 2>/dev/null || true)
  [ -n "$pids" ] && kill "-$2" $pids 2>/dev/null || true
}

stop_ns() {  # SIGTERM everything in the namespace, SIGKILL what is left after a grace period
  local ns=$1 i
  kill_ns_procs "$ns" TERM
  for i in $(seq 50); do
    [ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ] && return 0
    sleep 0.2
  done
  kill_ns_procs "$ns" KILL
}

cmd_down() {
  command -v ip >/dev/null || die "iproute2 is missing"
  for ns in "$NS0" "$NS1"; do
    if ns_exists "$ns"; then
      stop_ns "$ns"
      ip netns del "$ns"
    fi
    rm -rf "/etc/netns/$ns"
  done
  rmdir /etc/netns 2>/dev/null || true
  echo "down: $NS0 and $NS1 removed"
}

cmd_status() {
  for pair in "$NS0 $VETH0" "$NS1 $VETH1"; do
    set -- $pair
    if ns_exists "$1"; then
      echo "$1: $(ip -n "$1" -br addr show "$2" 2>/dev/null || echo "no $2")"
    else
      echo "$1: absent"
    fi
  done
}

# _node RANK VETH HOSTNAME NODE_DIR CMD...: runs inside `ip netns exec NS unshare --uts`: the host's
# own hostname, /dev/shm and TMPDIR, gloo/tensorpipe/NCCL on the veth, then exec CMD.
cmd_node() {
  local rank=$1 veth=$2 host=$3 dir=$4
  shift 4
  hostname "$host"
  if [ "${OPTSEL_SHARED_SHM:-0}" != 1 ]; then
    mount -t tmpfs -o mode=1777,size=50% "optsel-shm-node$rank" /dev/shm
  fi
  mkdir -p "$dir/tmp"
  export TMPDIR="$dir/tmp" XDG_CACHE_HOME="$dir/cache" GLOO_SOCKET_IFNAME="$veth" TP_SOCKET_IFNAME="$veth" NCCL_SOCKET_IFNAME="$veth"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/optsel/torch_extensions}
  echo "node $rank: host $(hostname), $veth $(ip -br -4 addr show "$veth" | awk '{print $3}'), TMPDIR=$TMPDIR," \
       "/dev/shm $( [ "${OPTSEL_SHARED_SHM:-0}" = 1 ] && echo shared || echo private)"
  echo "+ $*"
  exec "$@"
}

cmd_run() {
  [ $# -ge 2 ] || die "usage: $0 run torchrun|deepspeed CONFIG [key=value ...]"
  need_tools
  local launcher=$1
  shift
  ns_exists "$NS0" && ns_exists "$NS1" || die "namespaces $NS0/$NS1 are missing: run '$0 up' first"
  local py=${OPTSEL_PYTHON:-}
  if [ -z "$py" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then py="$REPO/.venv/bin/python"; else py=$(command -v python3); fi
  fi
  local port=${OPTSEL_MASTER_PORT:-29500} nproc=${OPTSEL_NPROC_PER_NODE:-1} timeout=${OPTSEL_RUN_TIMEOUT:-900}
  local workdir=${OPTSEL_WORKDIR:-}
  [ -n "$workdir" ] || workdir=$(mktemp -d /tmp/optsel-2node.XXXXXX)
  mkdir -p "$workdir"
  workdir=$(cd "$workdir" && pwd)
  local rdzv_id="optsel-$$-$(date +%s)"
  local -a cmd0 cmd1
  case "$launcher" in
    torchrun)
      for r in 0 1; do
        local -n c="cmd$r"
        c=("$py" -m torch.distributed.run --nnodes 2 --nproc_per_node "$nproc" --rdzv_backend c10d
           --rdzv_endpoint "$HOST0:$port" --rdzv_id "$rdzv_id" -m optsel.launch.train "$@")
        unset -n c
      done ;;
    deepspeed)
      local ds
      ds="$(dirname "$py")/deepspeed"
      [ -x "$ds" ] || ds=$(command -v deepspeed) || die "the deepspeed launcher is not installed"
      printf '%s slots=%s\n%s slots=%s\n' "$HOST0" "$nproc" "$HOST1" "$nproc" > "$workdir/hostfile"
      for r in 0 1; do
        local -n c="cmd$r"
        c=("$ds" --hostfile "$workdir/hostfile" --no_ssh --num_nodes 2 --node_rank "$r" --num_gpus "$nproc"
           --master_addr "$HOST0" --master_port "$port" --module optsel.launch.train "$@")
        unset -n c
      done ;;
    *) die "launcher: expected torchrun or deepspeed, got '$launcher'" ;;
  esac

  local -a pids=(0 0) rcs=(- -) nss=("$NS0" "$NS1")
  stop_all() {  # both at once; wait only for these two (a bare `wait` would reap the nodes' exit codes)
    local s0 s1
    stop_ns "$NS0" & s0=$!
    stop_ns "$NS1" & s1=$!
    wait "$s0" "$s1" || true
  }
  trap 'echo "netns_two_node: interrupted, stopping both nodes" >&2; stop_all; exit 130' INT TERM
  echo "run: $launcher on $NS0 ($HOST0) and $NS1 ($HOST1), $nproc process(es) per node, workdir $workdir"
  local r
  for r in 0 1; do
    local -n c="cmd$r"
    local veth host
    if [ "$r" = 0 ]; then veth=$VETH0; host=$HOST0; else veth=$VETH1; host=$HOST1; fi
    ip netns exec "${nss[$r]}" unshare --uts -- bash "$SELF" _node "$r" "$veth" "$host" "$workdir/node$r" "${c[@]}" \
      > >(tee "$workdir/node$r.log" | sed -u "s/^/[node$r] /") 2>&1 &
    pids[$r]=$!
    unset -n c
  done

  local deadline=$((SECONDS + timeout)) failed="" timed_out=0
  while :; do
    for r in 0 1; do
      if [ "${rcs[$r]}" = - ] && ! kill -0 "${pids[$r]}" 2>/dev/null; then
        local rc=0
        wait "${pids[$r]}" || rc=$?
        rcs[$r]=$rc
        if [ "$rc" != 0 ] && [ -z "$failed" ] && [ "$timed_out" = 0 ]; then
          failed=$r
          local other=$((1 - r))
          if [ "${rcs[$other]}" = - ]; then
            echo "netns_two_node: node $r exited with $rc: stopping node $other" >&2
            stop_ns "${nss[$other]}"
          fi
        fi
      fi
    done
    [ "${rcs[0]}" != - ] && [ "${rcs[1]}" != - ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "netns_two_node: overall timeout of ${timeout}s reached: stopping both nodes" >&2
      timed_out=1
      stop_all
      deadline=$((SECONDS + 30))  # then collect the exit codes
    fi
    sleep 0.5
  done
  trap - INT TERM
  wait 2>/dev/null || true  # the output filters
  echo "node0 exit ${rcs[0]}, node1 exit ${rcs[1]} (logs: $workdir/node0.log $workdir/node1.log)"
  if [ "$timed_out" = 1 ]; then return 124; fi
  if [ -n "$failed" ]; then return "${rcs[$failed]}"; fi
  return 0
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status "$@" ;;
  run) shift; cmd_run "$@" ;;
  _node) shift; cmd_node "$@" ;;
  *) echo "usage: $0 {up|down|status|run torchrun|deepspeed CONFIG [key=value ...]}  (see the header of this file)" >&2
     exit 2 ;;
esac
