#!/bin/sh
# The compose stack's secrets (docker-compose.yml `secrets:`), one file each in SECRETS_DIR (default
# ./secrets; a relative path is taken from docker-compose.yml's folder, as compose does): random on the first run. A file that exists is
# kept, so running this again never changes a password PostgreSQL already has; to choose one yourself, write
# its file before running this. Refuses a `change-me…` placeholder. The folder is the owner's only (0700);
# the files are 0644 because each container reads its own as a non-root user (compose mounts the file alone).
set -eu
cd "$(dirname "$0")/.."
dir="${SECRETS_DIR:-./secrets}"

umask 077
mkdir -p "$dir"
chmod 700 "$dir"

random() {  # 32 random bytes as 64 hex digits: safe in URLs, config files and `user:password`
  od -An -vtx1 -N32 /dev/urandom | tr -d ' \n'
}

write() {  # NAME VALUE: write the file unless it exists
  if [ ! -e "$dir/$1" ]; then
    printf '%s\n' "$2" > "$dir/$1.tmp"
    chmod 644 "$dir/$1.tmp"
    mv "$dir/$1.tmp" "$dir/$1"
    echo "wrote $dir/$1"
  fi
  case "$(tr '[:upper:]' '[:lower:]' < "$dir/$1")" in
    *change-me*|*changeme*|*change_me*)
      echo "error: $dir/$1 holds a change-me placeholder: delete it (or write a real secret) and run this again" >&2
      exit 1 ;;
  esac
}

write postgres_password "$(random)"
write redis_password "$(random)"
write redis.conf "requirepass $(cat "$dir/redis_password")"
if [ "$(cat "$dir/redis.conf")" != "requirepass $(cat "$dir/redis_password")" ]; then
  echo "error: $dir/redis.conf is not 'requirepass <redis_password>': delete it and run this again" >&2
  exit 1
fi
write metrics_token "$(random)"
write flower_basic_auth "admin:$(random)"
write grafana_admin_password "$(random)"
