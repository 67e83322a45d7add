# Shared by scripts/broker and scripts/cluster: RabbitMQ nodes of a chosen version, each
# run from a Debian root file system of its own (a chroot), on ports of its own.
#
# RMQDELAY_BROKER_VERSION picks the version (default 4.3):
#   4.3   Debian forky's rabbitmq-server (4.3.x, Erlang/OTP 29)
#   4.0   Debian trixie's (4.0.x)
#   3.10  Debian 12 bookworm's (3.10.8)
# The root is built once with debootstrap under RMQDELAY_BROKER_DIR (default
# /var/lib/rmqdelay/brokers) and kept, so a second start costs seconds. Each version has a
# slot S (3.10: 1, 4.0: 2, 4.3: 3) and node n (0: the standalone broker, 1-3: cluster
# nodes) listens on
#   AMQP 5700+10S+n, management 15700+10S+n, Prometheus 15800+10S+n,
#   Erlang distribution 25700+10S+n, with an epmd of the version's own on 4300+10S,
# so that brokers of several versions (and a cluster beside a standalone node) run side by
# side without touching anything on the usual ports. Nodes run as the root's rabbitmq user
# (chroot --userspec, which keeps the open-file limit that `su` would reset). A node is
# stopped, killed or restarted only through the pid file it was started with.
#
# A NODE argument is a short name (the node is NODE@this host) or a full name@host; a node
# named after an address (a cluster node in a network namespace of its own, scripts/cluster)
# uses long names, and RMQ_NETNS names the namespace its commands run in.
#
# The caller defines say() and die().

RMQ_VERSION="${RMQDELAY_BROKER_VERSION:-4.3}"
RMQ_DIR="${RMQDELAY_BROKER_DIR:-/var/lib/rmqdelay/brokers}"
RMQ_MIRROR="${RMQDELAY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
case "$RMQ_VERSION" in
  4.3) RMQ_SUITE=forky; RMQ_SCRIPT=sid; RMQ_SLOT=3 ;;
  4.0) RMQ_SUITE=trixie; RMQ_SCRIPT=trixie; RMQ_SLOT=2 ;;
  3.10) RMQ_SUITE=bookworm; RMQ_SCRIPT=bookworm; RMQ_SLOT=1 ;;
  *) die "RMQDELAY_BROKER_VERSION must be 4.3, 4.0 or 3.10 (got '$RMQ_VERSION')" ;;
esac
RMQ_TAG="${RMQ_VERSION//./}"              # 43, 40, 310: part of node names
RMQ_ROOT="$RMQ_DIR/rabbitmq-$RMQ_VERSION"
RMQ_HOST=$(hostname -s)
RMQ_EPMD_PORT=$((4300 + 10 * RMQ_SLOT))
RMQ_WANT_FILES=65536
# Inside the root: one directory per node (config, data, logs, pid file).
RMQ_NODES_DIR=/var/lib/rabbitmq/rmqdelay

rmq_port() {  # rmq_port KIND N: amqp|management|prometheus|dist port of node N (0-3)
  local base
  case "$1" in
    amqp) base=5700 ;;
    management) base=15700 ;;
    prometheus) base=15800 ;;
    dist) base=25700 ;;
  esac
  echo $((base + 10 * RMQ_SLOT + $2))
}

rmq_url() { echo "amqp://guest:guest@localhost:$(rmq_port amqp "$1")/%2F"; }
rmq_management_url() { echo "http://localhost:$(rmq_port management "$1")"; }

rmq_answers() {  # rmq_answers PORT: does a TCP connection to localhost:PORT succeed?
  python3 - "$1" <<'PY'
import socket, sys
try:
    socket.create_connection(("localhost", int(sys.argv[1])), timeout=3).close()
except OSError:
    sys.exit(1)
PY
}

rmq_ids() {  # the root's rabbitmq uid:gid (numbers: names mean other users outside it)
  local uid gid
  uid=$(awk -F: '$1 == "rabbitmq" {print $3}' "$RMQ_ROOT/etc/passwd")
  gid=$(awk -F: '$1 == "rabbitmq" {print $4}' "$RMQ_ROOT/etc/passwd")
  [ -n "$uid" ] && [ -n "$gid" ] || die "no rabbitmq user in $RMQ_ROOT/etc/passwd"
  echo "$uid:$gid"
}

rmq_remove() {  # rmq_remove DIR: delete a root, never what is mounted inside it
  local mounted
  [ -e "$1" ] || return 0
  for mounted in $(awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$mounted" 2>/dev/null || true
  done
  rm -rf --one-file-system "$1"
}

rmq_build_root() {  # debootstrap the version's root once (under a lock: CI may race)
  [ -f "$RMQ_ROOT/.rmqdelay-ready" ] && return 0
  [ "$(id -u)" = 0 ] || die "building $RMQ_ROOT needs root (debootstrap, chroot)"
  mkdir -p "$RMQ_DIR"
  exec 9>"$RMQ_DIR/.lock-$RMQ_VERSION"
  flock 9
  if [ ! -f "$RMQ_ROOT/.rmqdelay-ready" ]; then
    if ! command -v debootstrap >/dev/null 2>&1; then
      command -v apt-get >/dev/null 2>&1 || die "need debootstrap (or apt-get to install it)"
      # One apt at a time: roots of several versions may be built at once.
      (
        flock 8
        command -v debootstrap >/dev/null 2>&1 && exit 0
        say "installing debootstrap from Debian's packages"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2 \
          || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2; }
      ) 8>"$RMQ_DIR/.lock-apt" || die "apt-get install debootstrap failed"
    fi
    local script=/usr/share/debootstrap/scripts/$RMQ_SCRIPT
    [ -e "$script" ] || die "this debootstrap has no script '$RMQ_SCRIPT' for Debian $RMQ_SUITE"
    say "building a Debian $RMQ_SUITE root with rabbitmq-server $RMQ_VERSION in $RMQ_ROOT (30-60 s, about 400 MB; kept for later runs)"
    rmq_remove "$RMQ_ROOT.tmp"  # what a failed build left
    debootstrap --variant=minbase --include=rabbitmq-server "$RMQ_SUITE" "$RMQ_ROOT.tmp" \
        "$RMQ_MIRROR" "$script" > "$RMQ_DIR/debootstrap-$RMQ_VERSION.log" 2>&1 \
      || die "debootstrap of $RMQ_SUITE failed (see $RMQ_DIR/debootstrap-$RMQ_VERSION.log)"
    # A mirror snapshot may serve a Release file past its Valid-Until: apt in the root
    # (for anyone adding packages later) must not refuse it.
    echo 'Acquire::Check-Valid-Until "false";' > "$RMQ_ROOT.tmp/etc/apt/apt.conf.d/99rmqdelay"
    rm -f "$RMQ_ROOT.tmp"/var/cache/apt/archives/*.deb
    local got
    got=$(chroot "$RMQ_ROOT.tmp" dpkg-query -W -f '${Version}' rabbitmq-server) \
      || die "rabbitmq-server is not installed in $RMQ_ROOT.tmp"
    case "$got" in
      "$RMQ_VERSION".*) ;;
      *) die "Debian $RMQ_SUITE carries rabbitmq-server $got, not $RMQ_VERSION.x" ;;
    esac
    touch "$RMQ_ROOT.tmp/.rmqdelay-ready"
    rmq_remove "$RMQ_ROOT"
    mv "$RMQ_ROOT.tmp" "$RMQ_ROOT"
    say "rabbitmq-server $got is ready in $RMQ_ROOT"
  fi
  flock -u 9
}

rmq_mount() {  # what the Erlang VM needs inside the root
  local m
  for m in proc sys; do
    mountpoint -q "$RMQ_ROOT/$m" || mount -t "${m/sys/sysfs}" "$m" "$RMQ_ROOT/$m" \
      || die "cannot mount /$m in $RMQ_ROOT"
  done
  # Node names are name@host: the root must resolve this host as the host does.
  cp /etc/hosts "$RMQ_ROOT/etc/hosts"
}

rmq_unmount_if_idle() {  # when no node of ours runs from the root: stop its epmd, unmount
  local dir
  for dir in "$RMQ_ROOT$RMQ_NODES_DIR"/*/; do
    [ -d "$dir" ] && [ -n "$(rmq_pid "$(basename "$dir")@*")" ] && return 0
  done
  # The version's own epmd (ERL_EPMD_PORT), started with its first node.
  [ -d "$RMQ_ROOT/etc" ] && rmq_in_root epmd -kill >/dev/null 2>&1 || true
  local m
  for m in sys proc; do
    mountpoint -q "$RMQ_ROOT/$m" && umount "$RMQ_ROOT/$m" 2>/dev/null
  done
  return 0
}

rmq_full() {  # rmq_full NODE: its full name@host
  case "$1" in *@*) echo "$1" ;; *) echo "$1@$RMQ_HOST" ;; esac
}

rmq_in_root() {  # rmq_in_root CMD...: run CMD in the root as its rabbitmq user (in RMQ_NETNS)
  local netns=() longname=()
  if [ -n "${RMQ_NETNS:-}" ]; then
    netns=(ip netns exec "$RMQ_NETNS")
    longname=(RABBITMQ_USE_LONGNAME=true)
  fi
  "${netns[@]}" chroot --userspec="$(rmq_ids)" "$RMQ_ROOT" env -i \
    HOME=/var/lib/rabbitmq PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    ERL_EPMD_PORT="$RMQ_EPMD_PORT" "${longname[@]}" "$@"
}

rmq_ctl() {  # rmq_ctl NODE ARGS...: rabbitmqctl on NODE of this version, and no other
  local node=$1; shift
  rmq_in_root rabbitmqctl -q -n "$(rmq_full "$node")" "$@"
}

rmq_pid() {  # rmq_pid NODE: the OS pid of NODE's Erlang VM when it runs, else nothing
  # (NODE name@* for that name on any host)
  local pidfile="$RMQ_ROOT$RMQ_NODES_DIR/${1%@*}/pid" pid environ
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile" 2>/dev/null) || return 0
  # Only while that pid is still this node's VM: a pid file outlives its process, and the
  # number may since belong to another program.
  [ -n "$pid" ] || return 0
  environ=$(tr '\0' '\n' 2>/dev/null < "/proc/$pid/environ") || return 0
  case "$1" in
    *@\*) grep -q "^RABBITMQ_NODENAME=${1%@*}@" <<<"$environ" && echo "$pid" ;;
    *) grep -Fqx "RABBITMQ_NODENAME=$(rmq_full "$1")" <<<"$environ" && echo "$pid" ;;
  esac
  return 0
}

rmq_prepare() {  # rmq_prepare NODE N [fresh]: config for NODE as node N; fresh: no data
  # RMQ_EXTRA_CONF: more rabbitmq.conf lines; RMQ_GUEST_LOOPBACK_ONLY=false lets guest in
  # from another address (a cluster's private bridge)
  local node=$1 n=$2 dir="$RMQ_ROOT$RMQ_NODES_DIR/${1%@*}"
  [ "${3:-}" = fresh ] && rm -rf "$dir"
  mkdir -p "$dir/data" "$dir/log"
  cat > "$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = $(rmq_port amqp "$n")
management.tcp.port = $(rmq_port management "$n")
prometheus.tcp.port = $(rmq_port prometheus "$n")
loopback_users.guest = ${RMQ_GUEST_LOOPBACK_ONLY:-true}
EOF
  [ -z "${RMQ_EXTRA_CONF:-}" ] || echo "$RMQ_EXTRA_CONF" >> "$dir/rabbitmq.conf"
  echo '[rabbitmq_management,rabbitmq_prometheus].' > "$dir/enabled_plugins"
  cp "$RMQ_SCRIPTS/advanced.config" "$dir/advanced.config"
  chown -R "$(rmq_ids)" "$RMQ_ROOT/var/lib/rabbitmq"
}

rmq_launch() {  # rmq_launch NODE N: start NODE (prepared as node N) detached
  local node=$1 n=$2 dir="$RMQ_NODES_DIR/${1%@*}"
  [ -f "$RMQ_ROOT$dir/rabbitmq.conf" ] || die "node $node is not prepared ($RMQ_ROOT$dir)"
  rmq_mount
  rm -f "$RMQ_ROOT$dir/pid"
  # The soft limit is raised here, as root, and kept through chroot --userspec.
  ( ulimit -n "$RMQ_WANT_FILES" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    rmq_in_root \
      RABBITMQ_NODENAME="$(rmq_full "$node")" \
      RABBITMQ_NODE_PORT="$(rmq_port amqp "$n")" \
      RABBITMQ_DIST_PORT="$(rmq_port dist "$n")" \
      RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
      RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
      RABBITMQ_MNESIA_BASE="$dir/data" \
      RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_PID_FILE="$dir/pid" \
      /usr/lib/rabbitmq/bin/rabbitmq-server -detached ) >&2 \
    || die "rabbitmq-server -detached failed for $node (see $RMQ_ROOT$dir/log)"
}

rmq_await() {  # rmq_await NODE: until NODE has booted (its log says why not)
  local node=$1 deadline=$((SECONDS + 180))
  until rmq_ctl "$node" await_startup >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] \
      || die "$node did not start within 180 s (see $RMQ_ROOT$RMQ_NODES_DIR/${node%@*}/log)"
    sleep 1
  done
}

rmq_stop() {  # rmq_stop NODE: stop it gracefully, kill -9 if it will not go; quiet if not running
  local node=$1 pid
  pid=$(rmq_pid "$node")
  [ -n "$pid" ] || return 0
  rmq_ctl "$node" stop >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
  say "killed $node (pid $pid): it did not stop within 30 s"
}

rmq_kill() {  # rmq_kill NODE: kill -9 the node's VM and wait until it is gone
  local node=$1 pid
  pid=$(rmq_pid "$node")
  [ -n "$pid" ] || die "$node is not running (no live pid in its pid file)"
  kill -9 "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  die "$node (pid $pid) is still there 10 s after kill -9"
}
