#!/usr/bin/env bash
# Install tether into /opt/tether (a venv), its config example and systemd unit.
# Run as root from a checkout:  packaging/install.sh
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=${PREFIX:-/opt/tether}
make -C "$src" deps
python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install -q "$src"
install -d -m 0755 /etc/tether
[ -e /etc/tether/tether.toml ] || install -m 0644 "$src/oci-config/tether.toml.example" /etc/tether/tether.toml
install -m 0644 "$src/packaging/tether-fused.service" /etc/systemd/system/tether-fused.service
install -m 0644 "$src/packaging/tether.tmpfiles.conf" /etc/tmpfiles.d/tether.conf
for b in tether tether-fused tether-hook; do ln -sf "$prefix/venv/bin/$b" /usr/local/bin/$b; done
# podman: hooks.d files with this installation's absolute paths (read on every start)
"$prefix/venv/bin/tether" --config /etc/tether/tether.toml oci hooks-dir /etc/containers/oci/hooks.d
echo "installed in $prefix; start with: systemctl daemon-reload && systemctl enable --now tether-fused"
