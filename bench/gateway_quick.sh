#!/usr/bin/env bash
# Quick gateway figures (bench/RESULTS.md "Gateway, first figures"): mock-llm + wrk on core 0,
# one gateway worker on core 1, non-streamed chat at c=1 and c=64, direct baseline alongside.
# Usage: bash bench/setup.sh && bash bench/gateway_quick.sh   (from the repository root)
set -euo pipefail
dir=$(mktemp -d)
mock_port=${MOCK_PORT:-19411}; gw_port=${GW_PORT:-19412}
key=bench-key-0123456789abcdef
cat > "$dir/bench.yaml" <<YAML
telemetry: {access-log: "off"}
backends:
  - {id: mock, url: "http://127.0.0.1:$mock_port/v1"}
apis:
  - {id: chat, path: /openai, backend: mock}
subscriptions:
  - {id: a, scope: all-apis, primary-key: $key}
YAML
cat > "$dir/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["api-key"] = "$key"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello to the benchmark in one short sentence."}]}'
LUA
setsid taskset -c 0 python -m proxy mock-llm --port "$mock_port" > "$dir/mock.log" 2>&1 & mock=$!
setsid taskset -c 1 python -m proxy serve --config "$dir/bench.yaml" --host 127.0.0.1 --port "$gw_port" > "$dir/gw.log" 2>&1 & gw=$!
trap 'kill -- -$mock -$gw 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$gw_port/readyz" >/dev/null && break; sleep 0.1; done
for c in 1 64; do
  for url in "http://127.0.0.1:$mock_port/v1" "http://127.0.0.1:$gw_port/openai"; do
    taskset -c 0 wrk -t1 -c"$c" -d3s -s "$dir/post.lua" "$url/chat/completions" > /dev/null
    echo "c=$c $url"
    taskset -c 0 wrk -t1 -c"$c" -d8s --latency -s "$dir/post.lua" "$url/chat/completions" \
      | grep -E "Requests/sec| 50%| 99%|Non-2xx"
  done
done
