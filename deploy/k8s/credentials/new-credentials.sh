#!/bin/sh
# Writes the env files kustomization.yaml makes the Secrets from, next to this script: for each
# identity a random NATS and Redis password (hex: they go into URLs), and Ray's token. A file
# that exists is kept; delete it first to rotate that identity.
set -eu
cd "$(dirname "$0")"
umask 077
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
for identity in coordinator rollout reward buffer trainer operator; do
    if [ ! -e "$identity.env" ]; then
        printf 'nats-password=%s\nredis-password=%s\n' "$(random)" "$(random)" > "$identity.env"
    fi
done
if [ ! -e ray.env ]; then
    printf 'auth_token=%s\n' "$(random)" > ray.env
fi
