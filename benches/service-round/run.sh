#!/bin/sh
# One secure round, N = 100 clients, L = 1,000,000 parameters, over loopback QUIC, with raw quinn
# loopback throughput measured in the same run. Prints a table on stderr, one JSON line on stdout.
# Knobs (environment): FEDLORA_BENCH_CLIENTS, FEDLORA_BENCH_PARAMS, FEDLORA_BENCH_BASELINE_MB,
# FEDLORA_BENCH_WINDOW (server receive window per connection, bytes), FEDLORA_BENCH_SYNC (1/0).
set -eu
cd "$(dirname "$0")/../.."
exec cargo bench -p fedlora-service --bench service_round
