#!/bin/sh
# Make the secret files that compose.yaml and `kubectl create secret` (README.md) use:
#
#   secrets/backend.jwk.json         the service's SMART Backend Services private key (ES384 JWK
#                                    with kid): it signs client assertions to EHR token endpoints
#   secrets/backend.public.jwk.json  its public half: what an EHR administrator registers (the
#                                    compose EHR sandbox registers it at start); not secret
#   secrets/notification-token.txt   the secret the EHR's Subscription notifications carry
#   secrets/db-password.txt          PostgreSQL's password (the postgres image reads it)
#   secrets/database-url.txt         postgresql://cxr_cds:PASSWORD@$DB_HOST:5432/cxr_cds, read by
#                                    the service as CXR_CDS_DATABASE_URL_FILE (DB_HOST: postgres)
#
# Existing files are kept (re-running changes nothing). The folder is mode 0700; the files are
# 0644 so that the containers' non-root user (uid 10001) can read the bind-mounted copies.
# Needs a Python with joserfc: $PYTHON, else ../.venv/bin/python, else python3, else the web
# image (`docker compose build web` first).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dir=${SECRETS_DIR:-$here/secrets}
mkdir -p "$dir"
chmod 0700 "$dir"

KEYGEN='import json
from joserfc.jwk import ECKey
key = ECKey.generate_key("P-384", auto_kid=True)
print(json.dumps(key.as_dict(private=True)))'
PUBLIC='import json, sys
from joserfc.jwk import ECKey
key = ECKey.import_key(json.load(sys.stdin))
public = key.as_dict(private=False)
public.update({"use": "sig", "alg": "ES384", "kid": key.kid})
print(json.dumps(public))'

python_with_joserfc() {
  for candidate in "${PYTHON:-}" "$here/../.venv/bin/python" python3; do
    if [ -n "$candidate" ] && "$candidate" -c "import joserfc" 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
}
py=$(python_with_joserfc)
run_python() {  # run_python CODE  (standard input and output pass through)
  if [ -n "$py" ]; then
    "$py" -c "$1"
  else
    docker run --rm -i --entrypoint python "${WEB_IMAGE:-cxr-cds-web:local}" -c "$1"
  fi
}
random_hex() {  # 32 random bytes as 64 hex characters
  od -An -tx1 -N32 /dev/urandom | tr -d ' \n'
}
write_new() {  # write_new FILE: standard input into FILE, unless FILE exists
  if [ -e "$1" ]; then
    cat >/dev/null
    echo "kept    $1"
  else
    umask 077
    cat >"$1.tmp"
    chmod 0644 "$1.tmp"
    mv "$1.tmp" "$1"
    echo "created $1"
  fi
}

run_python "$KEYGEN" | write_new "$dir/backend.jwk.json"
run_python "$PUBLIC" <"$dir/backend.jwk.json" | write_new "$dir/backend.public.jwk.json"
random_hex | write_new "$dir/notification-token.txt"
random_hex | write_new "$dir/db-password.txt"
printf 'postgresql://cxr_cds:%s@%s:5432/cxr_cds\n' "$(cat "$dir/db-password.txt")" "${DB_HOST:-postgres}" |
  write_new "$dir/database-url.txt"
