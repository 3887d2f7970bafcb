#!/bin/sh
# rq-dashboard for the bulk-job queue (compose profile "dashboard", image target `dashboard`).
#
# Redis URL and password come from the same DENSECAP_* settings as the gateway; they reach rq-dashboard through
# its RQ_DASHBOARD_* environment variables, not argv. The page is guarded by HTTP basic auth: user "densecap",
# password = the gateway's API token (first of DENSECAP_API_TOKENS, else the generated <state dir>/token, which
# the gateway writes on its first start). Compose publishes it on 127.0.0.1 only: it speaks plain HTTP.
set -eu

state_dir=${DENSECAP_STATE_DIR:-/var/lib/densecap}
token=$(printf '%s' "${DENSECAP_API_TOKENS:-}" | tr ',' ' ' | awk '{print $1}')
if [ -z "$token" ]; then
    waited=0
    while [ ! -s "$state_dir/token" ]; do
        if [ "$waited" -ge 120 ]; then
            echo "dashboard: no API token: $state_dir/token was not written by the gateway within 120 s" \
                 "(is the gateway running with the gateway-state volume?), and DENSECAP_API_TOKENS is empty" >&2
            exit 1
        fi
        sleep 2
        waited=$((waited + 2))
    done
    token=$(cat "$state_dir/token")
fi

RQ_DASHBOARD_REDIS_URL=$(python - <<'EOF'
from urllib.parse import quote, urlsplit, urlunsplit

from densecap_core.settings import Settings

s = Settings.from_env()
if not s.redis_password:
    raise SystemExit("dashboard: no Redis password: set DENSECAP_REDIS_PASSWORD_FILE to the secrets volume's file")
u = urlsplit(s.redis_url)
print(urlunsplit((u.scheme, f":{quote(s.redis_password, safe='')}@{u.hostname}:{u.port or 6379}", u.path, "", "")))
EOF
)
RQ_DASHBOARD_USERNAME=densecap
RQ_DASHBOARD_PASSWORD=$token
export RQ_DASHBOARD_REDIS_URL RQ_DASHBOARD_USERNAME RQ_DASHBOARD_PASSWORD
echo "dashboard: rq-dashboard on port 9181 (user densecap, password: the API token)"
exec rq-dashboard --bind 0.0.0.0 --port 9181
