#!/usr/bin/env bash
# Debian packages the browser and PostgreSQL tests use: chromium and postgresql.
# Without root or apt-get, those tests skip and say so; everything else still runs.
set -uo pipefail
need=()
[[ -x /usr/bin/chromium ]] || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if (( ${#need[@]} == 0 )); then exit 0; fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "!! cannot install ${need[*]} (needs root and apt-get): browser/PostgreSQL tests will be skipped" >&2
  exit 0
fi
echo "== installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null || echo "!! apt-get install ${need[*]} failed: those tests will be skipped" >&2
