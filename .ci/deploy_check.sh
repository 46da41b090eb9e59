#!/usr/bin/env bash
# The Dockerfile's install steps without a container engine: build the wheel, install it into a
# fresh venv, run it as a non-root user with a data dir of its own, and probe /readyz the way the
# image's HEALTHCHECK does. Dependencies come from the project venv (.venv, built by `make`)
# through a .pth file, so nothing is downloaded; the wheel itself is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d /tmp/dicom-node-deploy.XXXXXX)
chmod 755 "$work"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
pid=""

"$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$work/wheels" .
# a system Python of the same minor version (readable by the service user), else the venv's base
minor=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
base_py=$("$PY" -c 'import sys; print(sys.base_prefix)')/bin/python3
if [ -x /usr/bin/python3 ] && [ "$(/usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" = "$minor" ]; then
  base_py=/usr/bin/python3
fi
"$base_py" -m venv "$work/venv"
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
  > "$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/project-deps.pth"
"$work/venv/bin/python" -m pip install --quiet --no-deps --no-index "$work"/wheels/*.whl

# the service user (the image's `dicomnode`); as non-root, the current user already is one
as_user=()
if [ "$(id -u)" = 0 ]; then
  id dicomnode >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin dicomnode
  as_user=(runuser -u dicomnode --)
  if ! runuser -u dicomnode -- "$work/venv/bin/python" -c 'import torch, dicom_node' 2>/dev/null; then
    echo "deploy check: the project venv is not readable by a non-root user here; running as root" >&2
    as_user=()
  fi
fi
mkdir -p "$work/data"
[ ${#as_user[@]} -gt 0 ] && chown dicomnode "$work/data"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
dicom_port=$(free_port); http_port=$(free_port)
cat > "$work/config.toml" <<TOML
[node]
port = $dicom_port
data_dir = "$work/data"
allow_any_calling_aet = true
disk_reserve_mb = 0
[scoring]
enabled = false
[http]
enabled = true
port = $http_port
TOML
chmod 644 "$work/config.toml"

cd "$work"   # run from outside the source tree: only the installed wheel can be imported
"${as_user[@]}" "$work/venv/bin/dicom-node" --version
"${as_user[@]}" "$work/venv/bin/dicom-node" --log-format json serve --config "$work/config.toml" \
  > "$work/node.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do
  if "$work/venv/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$http_port/readyz', timeout=4)" 2>/dev/null; then
    echo "deploy check: /readyz is green for the installed wheel (as $("${as_user[@]}" id -un))"
    kill -TERM "$pid"
    rc=0; wait "$pid" || rc=$?
    pid=""
    # runuser answers SIGTERM itself with 143 after passing it on; the node's own log says how it ended
    if grep -q '"node stopped"' "$work/node.log" && { [ "$rc" = 0 ] || [ "$rc" = 143 ]; }; then
      exit 0
    fi
    echo "deploy check: the node did not stop cleanly on SIGTERM (exit $rc)" >&2
    cat "$work/node.log" >&2
    exit 1
  fi
  if ! kill -0 "$pid" 2>/dev/null; then break; fi
  sleep 0.5
done
echo "deploy check: /readyz never went green" >&2
cat "$work/node.log" >&2
exit 1
