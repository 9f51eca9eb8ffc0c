#!/usr/bin/env bash
# What `make test` needs beyond the virtualenv: redis-server and MariaDB's server (the suite starts private ones
# of its own, demo/mariadb_server.py), and the tools some tests drive: Chromium and its driver (the console test,
# with a CJK font for its screenshot), wrk (the benchmark smoke tests), kubectl (the deployment tests), and
# Prometheus with promtool (the monitoring bundle's tests).
# Missing ones are installed with apt-get when run as root; otherwise this stops with the one command to run.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
{ command -v mariadb-install-db >/dev/null 2>&1 && { command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; }; } \
  || need+=(mariadb-server)

optional=()
command -v chromium >/dev/null 2>&1 || optional+=(chromium)
command -v chromedriver >/dev/null 2>&1 || optional+=(chromium-driver)
[ -e /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || optional+=(fonts-wqy-zenhei)
command -v wrk >/dev/null 2>&1 || optional+=(wrk)
command -v kubectl >/dev/null 2>&1 || optional+=(kubectl)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || optional+=(prometheus)

[ ${#need[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[make test] installing ${need[*]} ${optional[*]}"
  apt-get update -q >/dev/null
  export DEBIAN_FRONTEND=noninteractive
  if [ ${#need[@]} -gt 0 ]; then apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; fi
  for package in "${optional[@]}"; do  # one at a time: a tool this machine's sources lack only skips its tests
    apt-get install -y -q --no-install-recommends "$package" >/dev/null \
      || echo "[make test] $package could not be installed: the tests that need it are skipped"
  done
  exit 0
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "make test needs ${need[*]}: run \`sudo apt-get install ${need[*]}\` (the tests start private servers of their own)" >&2
  exit 1
fi
echo "[make test] not installed, so their tests are skipped: ${optional[*]} (\`sudo apt-get install ${optional[*]}\`)"
