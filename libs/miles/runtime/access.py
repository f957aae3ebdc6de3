"""The permissions table (``permissions.py``) written as server configuration: nats.conf's
``authorization`` block and a Redis ACL file. The embedded servers (``embedded.py``) and
deploy/ (``deploy/generate.py``) both write theirs with these two functions."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from miles.runtime.permissions import Rights

DEFAULT_USER_OFF = "user default off resetpass ~* &* +@all"
"""Redis's ``default`` user is the one a client without credentials is: switched off (and
without a password), so an unauthenticated connection can do nothing but authenticate, and no
one can authenticate as it, whatever its rights. Its rights are all: Redis 7.0 replays the AOF
as a client of this user and checks each ``EXEC`` against it, so with ``-@all`` every
transaction in the AOF (Lua scripts' effects included: the commits) was dropped on a restart
("-NOPERM ACLs rules changed between the moment the transaction was accumulated and the EXEC
call" in redis.log)."""


def nats_authorization(rights: Iterable[Rights], passwords: Mapping[str, str]) -> str:
    """nats.conf's ``authorization`` block: one user per entry of ``passwords`` (identity ->
    its config value: a quoted string, or ``$VARIABLE`` that nats-server takes from its
    environment), limited to its ``rights``; an identity without rights may do anything (the
    embedded servers' ``admin``). With users defined, nats-server refuses a client without
    credentials."""
    limits = {entry.identity: entry for entry in rights}
    users = []
    for identity, password in passwords.items():
        lines = ["    {", f"      user: {json.dumps(identity)}", f"      password: {password}"]
        if identity in limits:
            nats = limits[identity].nats
            lines += [
                "      permissions: {",
                *_allow("publish", nats.publish),
                *_allow("subscribe", nats.subscribe),
                "      }",
            ]
        users.append("\n".join([*lines, "    }"]))
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"


def _allow(direction: str, subjects: tuple[str, ...]) -> list[str]:
    # Quoted: nats-server would read a bare `$JS.API...` as a variable reference.
    return [
        f"        {direction}: {{",
        "          allow: [",
        *(f"            {json.dumps(subject)}" for subject in subjects),
        "          ]",
        "        }",
    ]


def redis_acl(rights: Iterable[Rights], secrets: Mapping[str, str], read_only: bool = True) -> str:
    """A Redis ACL file: ``default`` off, then one user per entry of ``secrets`` (identity ->
    ``>password``, or ``#<sha256 hex>`` of it), limited to its ``rights``; an identity without
    rights may do anything. ``read_only=False`` (Redis before 7, which has no ``%R~``) grants
    the read-only patterns read-write too. No comments: Redis refuses them in an ACL file."""
    limits = {entry.identity: entry for entry in rights}
    lines = [DEFAULT_USER_OFF]
    for identity, secret in secrets.items():
        if identity not in limits:
            lines.append(f"user {identity} on {secret} ~* &* +@all")
            continue
        redis = limits[identity].redis
        read_prefix = "%R~" if read_only else "~"
        rules = [
            "resetkeys",
            *(f"~{pattern}" for pattern in redis.write),
            *(f"{read_prefix}{pattern}" for pattern in redis.read),
            "resetchannels",
            "-@all",
            *(f"+{command}" for command in redis.commands),
        ]
        lines.append(" ".join(["user", identity, "on", secret, *rules]))
    return "\n".join(lines) + "\n"
