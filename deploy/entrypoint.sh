#!/bin/sh
# Entrypoint of the service images: runs `miles "$@"`. For `miles serve` it also
#   - appends --recipe, --run-id and --config from MILES_RECIPE, MILES_RUN_ID and MILES_CONFIG
#     (each only when set), so an image's CMD is just `serve <service>`;
#   - with MILES_METRICS_PORT, serves Prometheus /metrics on that port (infra.metrics_port);
#   - with MILES_RAY_JOIN=1 (the rollout and trainer images), first joins the Ray cluster at
#     RAY_ADDRESS as a node: a Ray driver (`ray.init(address=...)`) needs a raylet on its own
#     host. MILES_RAY_START_ARGS adds flags to `ray start` (e.g. --num-cpus=0).
set -eu
if [ "${1:-}" = serve ]; then
    if [ -n "${MILES_RECIPE:-}" ]; then set -- "$@" --recipe "$MILES_RECIPE"; fi
    if [ -n "${MILES_RUN_ID:-}" ]; then set -- "$@" --run-id "$MILES_RUN_ID"; fi
    if [ -n "${MILES_CONFIG:-}" ]; then set -- "$@" --config "$MILES_CONFIG"; fi
    if [ -n "${MILES_METRICS_PORT:-}" ]; then
        set -- "$@" --set "infra.metrics_port=$MILES_METRICS_PORT"
    fi
    if [ "${MILES_RAY_JOIN:-0}" = 1 ] && [ -n "${RAY_ADDRESS:-}" ]; then
        # shellcheck disable=SC2086  # MILES_RAY_START_ARGS is a list of flags: split it
        ray start --address="$RAY_ADDRESS" --disable-usage-stats ${MILES_RAY_START_ARGS:-}
    fi
fi
exec miles "$@"
