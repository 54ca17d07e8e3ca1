#!/bin/sh
# Starts redis-server with redis.conf plus the password from NIRVANA_REDIS_PASSWORD, passed on
# stdin so that it sits neither in a ConfigMap nor on a command line.
set -eu
case "${NIRVANA_REDIS_PASSWORD:-}" in
  "" | REPLACE_ME*)
    echo "redis: set NIRVANA_REDIS_PASSWORD (Secret nirvana-secrets, or deploy/.env for compose)" >&2
    exit 1 ;;
  *[!A-Za-z0-9._~-]*)
    echo "redis: NIRVANA_REDIS_PASSWORD may hold only letters, digits and ._~-" \
         "(python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one)" >&2
    exit 1 ;;
esac
exec redis-server /etc/redis/redis.conf - <<CONF
requirepass "$NIRVANA_REDIS_PASSWORD"
CONF
