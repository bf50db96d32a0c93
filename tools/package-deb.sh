#!/usr/bin/env bash
# Builds the Debian package: the fedslm binary, the systemd units of the server and the node, and example
# configurations under /etc/fedslm. Usage: tools/package-deb.sh [--binary PATH] [--out DIR] [--compression xz|none]
# (default: build the release binary; write target/debian/fedslm_<version>_<arch>.deb, xz-compressed; the
# tests package a debug binary uncompressed, to be quick). Needs dpkg-deb.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
out="target/debian"
compression="xz"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --compression) compression="$2"; shift 2 ;;
    *) echo "unknown argument $1; usage: $0 [--binary PATH] [--out DIR] [--compression xz|none]" >&2; exit 2 ;;
  esac
done
command -v dpkg-deb >/dev/null || { echo "needs dpkg-deb (Debian's dpkg)" >&2; exit 1; }
if [ -z "$binary" ]; then
  cargo build --release --locked
  binary=target/release/fedslm
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT

install -D -m 0755 "$binary" "$stage/usr/bin/fedslm"
for unit in packaging/systemd/*.service; do
  install -D -m 0644 "$unit" "$stage/lib/systemd/system/$(basename "$unit")"
done
for example in packaging/etc/*.example; do
  install -D -m 0644 "$example" "$stage/etc/fedslm/$(basename "$example")"
done
install -D -m 0644 README.md "$stage/usr/share/doc/fedslm/README.md"
install -D -m 0644 PROTOCOL.md "$stage/usr/share/doc/fedslm/PROTOCOL.md"

mkdir -p "$stage/DEBIAN"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: fedslm
Version: $version
Architecture: $arch
Maintainer: fedslm maintainers <fedslm@localhost>
Depends: libc6 (>= 2.34), adduser
Section: science
Priority: optional
Description: federated learning of synchronous liver metastasis prediction from rectal MRI
 A coordinating server and hospital nodes that train models on multiparametric MRI and clinical
 factors without sharing images: QUIC with mutual TLS, durable rounds, a signed audit log.
 Services: fedslm-server and fedslm-client (configure /etc/fedslm first; see the .example files).
CONTROL

cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd fedslm >/dev/null; then
    adduser --system --group --home /var/lib/fedslm --no-create-home --quiet fedslm
  fi
  install -d -o fedslm -g fedslm -m 0750 /var/lib/fedslm
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
  fi
fi
POSTINST
chmod 0755 "$stage/DEBIAN/postinst"

cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null || true
fi
POSTRM
chmod 0755 "$stage/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/fedslm_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compression" --build "$stage" "$deb" >/dev/null
echo "$deb"
