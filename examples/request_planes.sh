#!/usr/bin/env bash
# Launch workers and a caller on the request plane named by the first argument: tcp, http or nats.
# The counterpart of the reference system's agg_request_planes.sh.
#
#   examples/request_planes.sh tcp
#   examples/request_planes.sh http
#   NATS_SERVER=nats://127.0.0.1:4222 examples/request_planes.sh nats   # needs a running nats-server
#
# Discovery is the file backend in a temporary directory, so nothing else needs to run.
set -euo pipefail
plane="${1:-tcp}"
case "$plane" in tcp|http|nats) ;; *) echo "usage: $0 tcp|http|nats" >&2; exit 2 ;; esac

python="${PYTHON:-python3}"
kv_dir="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$kv_dir"
}
trap cleanup EXIT

export DYN_REQUEST_PLANE="$plane"
export DYN_DISCOVERY_BACKEND=file DYN_FILE_KV="$kv_dir" DYN_LOG="${DYN_LOG:-warning}"
export DYN_TCP_RPC_HOST=127.0.0.1 DYN_HTTP_RPC_HOST=127.0.0.1
if [ "$plane" = http ]; then export DYN_HTTP_RPC_PORT=0; fi  # several workers on one host

for n in 1 2; do
  "$python" -m troupe worker demo.backend.words troupe.demo:words 2>"$kv_dir/worker-$n.log" &
  pids+=("$!")
done

# Wait for both registrations; a worker that exits (no NATS server, a port taken...) is reported
# with its own error line at once.
echo "workers on the $plane plane:"
deadline=$((SECONDS + 30))
until [ "$("$python" -m troupe instances --json | wc -l)" -ge 2 ]; do
  for n in 1 2; do
    if ! kill -0 "${pids[$((n - 1))]}" 2>/dev/null; then
      echo "worker $n failed to start:" >&2
      grep -v '^\s*$' "$kv_dir/worker-$n.log" | tail -n 3 >&2
      exit 1
    fi
  done
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "the workers did not register within 30 s; their logs:" >&2
    tail -n 5 "$kv_dir"/worker-*.log >&2
    exit 1
  fi
  sleep 0.2
done
"$python" -m troupe instances

echo
echo "calling demo.backend.words twice (round robin):"
"$python" -m troupe call demo.backend.words '{"text": "hello from the request plane"}' --count 2
