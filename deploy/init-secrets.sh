#!/bin/sh
# One-shot set-up of the Redis password (compose service `init-secrets`, runs as root in the gateway image).
#
# The password lives in the `secrets` volume as redis-password, owned by the app user (uid 10001), mode 0400:
#   - gateway, worker and jobs read it through DENSECAP_REDIS_PASSWORD_FILE;
#   - redis reads it as root before it drops privileges, and gets it on stdin (never in argv or a config file).
# Where it comes from:
#   - REDIS_PASSWORD set (for example in .env beside docker-compose.yml): that one, rewritten on every start;
#   - otherwise a random one made on the first start and kept (so the AOF data and the password stay paired).
# No password is ever written in a committed file, and Redis never starts without one.
set -eu

dir=${SECRETS_DIR:-/run/densecap-secrets}
file="$dir/redis-password"
app_uid=${APP_UID:-10001}
umask 077
mkdir -p "$dir"

if [ -n "${REDIS_PASSWORD:-}" ]; then
    # It ends up on a Redis config line and in redis:// URLs: keep to characters that need no quoting.
    case "$REDIS_PASSWORD" in
        *[!A-Za-z0-9._~-]*)
            echo "init-secrets: REDIS_PASSWORD may only hold letters, digits and . _ ~ - ; pick another" >&2
            exit 1 ;;
    esac
    if [ "${#REDIS_PASSWORD}" -lt 16 ]; then
        echo "init-secrets: REDIS_PASSWORD is shorter than 16 characters; pick a longer one (or unset it to" \
             "have one generated)" >&2
        exit 1
    fi
    printf '%s\n' "$REDIS_PASSWORD" > "$file.new"
    mv "$file.new" "$file"
    echo "init-secrets: Redis password taken from REDIS_PASSWORD"
elif [ ! -s "$file" ]; then
    # 40 characters from /dev/urandom (about 238 bits), letters and digits only.
    tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 40 > "$file.new"
    echo >> "$file.new"
    mv "$file.new" "$file"
    echo "init-secrets: generated a Redis password into the secrets volume"
else
    echo "init-secrets: Redis password already set (kept)"
fi

chown "$app_uid:$app_uid" "$file"
chmod 0400 "$file"
chmod 0755 "$dir"
