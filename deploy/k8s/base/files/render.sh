#!/bin/sh
# render.sh SOURCE_DIR TARGET_DIR COMMAND [ARG]...
#
# Copies every file of SOURCE_DIR into TARGET_DIR (readable by this user only), each {{NAME}}
# replaced by the environment variable NAME, then runs COMMAND. The NATS and Redis containers
# start through it (docker-compose.yml, deploy/k8s): their access configs, generated from the
# permissions table by deploy/generate.py, are scoped to the run id, and Redis's ACL file holds
# the passwords; only the environment knows either. An unset or empty NAME stops it.
set -eu
source_dir=$1
target_dir=$2
shift 2
umask 077
mkdir -p "$target_dir"
for file in "$source_dir"/*; do
    [ -f "$file" ] || continue
    script=""
    for name in $(grep -o '{{[A-Za-z_][A-Za-z0-9_]*}}' "$file" | sort -u | tr -d '{}'); do
        eval "value=\${$name:-}"
        if [ -z "$value" ]; then
            echo "render.sh: $name is not set; $file needs it" >&2
            exit 1
        fi
        escaped=$(printf '%s' "$value" | sed -e 's/[\/&]/\\&/g')
        script="$script s/{{$name}}/$escaped/g;"
    done
    sed -e "$script" "$file" > "$target_dir/$(basename "$file")"
done
exec "$@"
