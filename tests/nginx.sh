#!/usr/bin/env bash
# A real web server for the streaming-loader tests and benchmark: Debian's nginx on 127.0.0.1.
#
#   tests/nginx.sh install          install Debian's nginx if it is missing (needs root)
#   tests/nginx.sh up DIR PORT      install if missing, then serve DIR (read-only, static files) on
#                                   http://127.0.0.1:PORT/; waits until it answers
#   tests/nginx.sh down PORT        stop the server that `up` started on PORT
#   tests/nginx.sh down             stop every server `up` started
#
# Each server has its own prefix, configuration, pid and logs under $STATE/PORT (no system
# configuration is read or changed, nothing listens outside 127.0.0.1). As root the workers
# run as root, so that they can read private temporary directories (pytest's are mode 700).
# Exit status 3: nginx is missing and cannot be installed (not root, or apt-get failed).
set -euo pipefail

STATE=${SF2DIST_NGINX_STATE:-${TMPDIR:-/tmp}/sf2dist-nginx}
NGINX=/usr/sbin/nginx

log() { echo "nginx.sh: $*" >&2; }

install_nginx() {
  if [ -x "$NGINX" ]; then return; fi
  if [ "$(id -u)" != 0 ]; then
    log "nginx is not installed and this is not root: cannot install it"; exit 3
  fi
  log "installing nginx from Debian's packages"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null 2>&1 || {
      log "apt-get install nginx failed"; exit 3; }
  fi
}

up() {
  local root port dir
  root=$(cd "${1:?usage: nginx.sh up DIR PORT}" && pwd)
  port=${2:?usage: nginx.sh up DIR PORT}
  install_nginx
  dir=$STATE/$port
  mkdir -p "$dir/logs" "$dir/tmp"
  if [ -s "$dir/nginx.pid" ] && kill -0 "$(cat "$dir/nginx.pid")" 2>/dev/null; then
    log "a server started by this script already listens on port $port; run: tests/nginx.sh down $port"; exit 1
  fi
  local user=""
  if [ "$(id -u)" = 0 ]; then user="user root;"; fi
  cat >"$dir/nginx.conf" <<EOF
$user
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  types { application/x-tar tar; application/json json; }
  default_type application/octet-stream;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  server {
    listen 127.0.0.1:$port;
    root $root;
    location / { limit_except GET HEAD { deny all; } }
  }
}
EOF
  "$NGINX" -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf"
  for _ in $(seq 100); do
    if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
      echo "$root" >"$dir/root"
      return
    fi
    sleep 0.05
  done
  log "nginx did not answer on 127.0.0.1:$port; its log:"; tail -n 20 "$dir/logs/error.log" >&2 || true
  down_one "$port"; exit 1
}

down_one() {
  local dir=$STATE/$1 pid
  [ -s "$dir/nginx.pid" ] || return 0
  pid=$(cat "$dir/nginx.pid")
  kill -QUIT "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -rf "$dir"
}

case "${1:-}" in
  install) install_nginx ;;
  up) shift; up "$@" ;;
  down)
    if [ -n "${2:-}" ]; then down_one "$2"
    elif [ -d "$STATE" ]; then for d in "$STATE"/*/; do [ -d "$d" ] && down_one "$(basename "$d")"; done
    fi ;;
  *) echo "usage: tests/nginx.sh install | up DIR PORT | down [PORT]" >&2; exit 2 ;;
esac
