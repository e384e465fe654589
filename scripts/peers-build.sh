#!/usr/bin/env bash
# Unpack and build one peer archive (../shared/peers/*.tar.gz) under
# .peers-cache/<archive sha256>/, once: a later run with the same archive reuses the build.
# Prints the built project's folder on the last line of standard output.
#   scripts/peers-build.sh ARCHIVE
set -euo pipefail
archive=$1
root=$(cd "$(dirname "$0")/.." && pwd)
sha=$(sha256sum "$archive" | cut -d' ' -f1)
cache="$root/.peers-cache/$sha"
name=$(tar tzf "$archive" | awk -F/ 'NR == 1 { print $1 }')
if [ -f "$cache/.built" ]; then
    echo "peers: $name cached ($cache)" >&2
    echo "$cache/$name"
    exit 0
fi
echo "peers: building $name from $(basename "$archive") (npm ci + npm run build)" >&2
rm -rf "$cache"
mkdir -p "$cache"
tar xzf "$archive" -C "$cache"
(
    cd "$cache/$name"
    npm ci --no-audit --no-fund --loglevel=error >"$cache/npm-ci.log" 2>&1 ||
        { tail -40 "$cache/npm-ci.log" >&2; exit 1; }
    npm run build >"$cache/npm-build.log" 2>&1 ||
        { tail -40 "$cache/npm-build.log" >&2; exit 1; }
)
touch "$cache/.built"
echo "$cache/$name"
