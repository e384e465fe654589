#!/usr/bin/env bash
# `make peers-check`: the real CDS Hooks sandbox and SMART launcher against the project.
# Builds both peers from their source archives (../shared/peers, or PEERS_DIR), cached under
# .peers-cache/<archive sha256>/, then runs tests/peers: `cxr-cds demo`, the launcher and the
# sandbox's built SPA on loopback, driven in Debian's Chromium (screenshots: test-artifacts/peers/).
# Without the archives it says so and succeeds (nothing to check against).
set -euo pipefail
cd "$(dirname "$0")/.."
peers=${PEERS_DIR:-../shared/peers}
shopt -s nullglob
sandboxes=("$peers"/cds-hooks-sandbox-*.tar.gz)
launchers=("$peers"/smart-launcher-v2-*.tar.gz)
if [ ${#sandboxes[@]} -eq 0 ] || [ ${#launchers[@]} -eq 0 ]; then
    echo "peers-check skipped: no cds-hooks-sandbox-*.tar.gz and smart-launcher-v2-*.tar.gz" \
        "in $peers (set PEERS_DIR to the folder that holds them)"
    exit 0
fi
start=$(date +%s)
cds_sandbox=$(scripts/peers-build.sh "${sandboxes[-1]}" | tail -1)
launcher=$(scripts/peers-build.sh "${launchers[-1]}" | tail -1)
built=$(date +%s)
status=0
CXR_CDS_PEERS_CHECK=1 CXR_CDS_PEERS_CDS_SANDBOX=$cds_sandbox CXR_CDS_PEERS_LAUNCHER=$launcher \
    .venv/bin/python -m pytest tests/peers -p no:cacheprovider -rs || status=$?
end=$(date +%s)
echo "peers-check: build $((built - start)) s, browser checks $((end - built)) s," \
    "total $((end - start)) s; screenshots in test-artifacts/peers/"
exit $status
