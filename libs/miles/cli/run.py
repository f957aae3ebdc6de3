"""`miles run`: everything on this machine, each service its own OS process.

resolve the config and run the recipe's @miles.setup (or, with --resume, read both back)
start nats-server and redis-server (unless NATS_URL / REDIS_URL) and a local Ray head; the
    embedded servers get one user per service (runtime/permissions.py) and an admin, this
    launcher: its URLs stay here, config.json holds none (`miles status` takes the operator's
    from <run_dir>/redis/urls.json)
start the five services with `miles serve`, each with its own /metrics port (metrics_ports.json)
    and its own NATS_URL / REDIS_URL
supervise: restart a crashed service, or a crashed embedded server on its own store, with
    backoff, a log line and a count
show live progress until the coordinator reports the run finished
write runs/<run_id>/summary.json, steps.jsonl, metrics.json and (every 2 s while running)
    timeline.jsonl, what `miles report` reads
export the last step as a Hugging Face model into runs/<run_id>/final/ (`miles export`): after
    the services stopped, before the embedded servers do (the weights may be in NATS)
stop everything, Ctrl-C included

A run stopped for any reason resumes with `miles run --resume <run_id>`: the embedded servers
restart on the run's JetStream store and Redis AOF, and every service continues from Redis (the
trainer from the latest checkpoint manifest, the coordinator from its dataset cursor).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from miles import models
from miles.cli import export, preflight, report, track
from miles.cli.common import config_args, resolve_config, run_id_arg
from miles.cli.ending import ending_line, resume_command, why_unfinished
from miles.cli.live import LiveView
from miles.cli.outage import UNREACHABLE, Outage, RedisOutage, launcher_client
from miles.config import MilesConfig
from miles.recipe import Recipe, load_recipe
from miles.runtime import embedded, raycluster
from miles.runtime.run_view import RunView
from miles.runtime.service import SERVICES
from miles.runtime.store import RunKeys
from miles.runtime.subjects import check_run_id

DRAINED = 3
"""`miles run`'s exit code for a run an operator drained (`miles drain`): stopped on purpose at a
committed step, to be continued with ``--resume``."""


@dataclass
class Child:
    """One supervised service process."""

    service: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    streak: int = 0
    started: float = 0.0
    next_start: float = 0.0
    backoff: float = 1.0
    log_handles: list[object] = field(default_factory=list)

    def start(self) -> None:
        self.started = time.monotonic()
        handle = self.log_path.open("ab")
        self.log_handles.append(handle)
        self.process = subprocess.Popen(
            self.argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env
        )

    def stop(self) -> None:
        if self.process:
            embedded.stop_process(self.process, timeout=15)
        for handle in self.log_handles:
            handle.close()  # type: ignore[attr-defined]


@dataclass
class Launch:
    """What `miles run` decided, saved as ``launch.json`` so --resume can decide the same."""

    recipe: str
    embedded_nats: bool
    embedded_redis: bool

    def save(self, run_dir: Path) -> None:
        (run_dir / "launch.json").write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> Launch:
        path = run_dir / "launch.json"
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} holds no launch.json: not a `miles run` run dir")
        return cls(**json.loads(path.read_text()))


def prepare(args: argparse.Namespace) -> tuple[Recipe, MilesConfig, str, Path, Launch]:
    """A new run's recipe, config and directory; or those of the run being resumed."""
    if args.resume:
        run_id = args.resume
        run_dir = (args.output_dir / run_id).resolve()
        launch = Launch.load(run_dir)
        recipe = load_recipe(Path(launch.recipe))
        config = MilesConfig.model_validate_json((run_dir / "config.json").read_text())
        config = resolve_config(config, None, args.overrides)
        infra = config.infra
        infra.nats_url = None if launch.embedded_nats else infra.nats_url
        infra.redis_url = None if launch.embedded_redis else infra.redis_url
        infra.ray_address = os.environ.get("RAY_ADDRESS")
        print(f"miles: resuming run {run_id} from {run_dir}", flush=True)
        return recipe, config, run_id, run_dir, launch
    if args.recipe is None:
        raise FileNotFoundError("miles run needs a recipe file, or --resume RUN_ID")
    recipe = load_recipe(args.recipe)
    config = resolve_config(recipe.config, args.config, args.overrides)
    run_id = check_run_id(
        args.run_id or f"{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    )
    run_dir = (config.run.output_dir / run_id).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if recipe.setup is not None:
        print(f"miles: running {recipe.setup.__name__}() from {recipe.path.name}", flush=True)
        config = recipe.setup(config)
    launch = Launch(str(recipe.path), not config.infra.nats_url, not config.infra.redis_url)
    launch.save(run_dir)
    return recipe, config, run_id, run_dir, launch


class Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `kill`, `timeout`): stopped as Ctrl-C stops a run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="run a recipe end to end on this machine",
        description="Start NATS, Redis and Ray if needed, then the five services "
        "as separate processes; show live progress; write runs/<id>/summary.json.",
    )
    run.add_argument("recipe", type=Path, nargs="?", help="the recipe file (Python)")
    config_args(run)
    run.add_argument("--run-id", type=run_id_arg, help="run id (default: <run.name>-<time>)")
    run.add_argument(
        "--resume",
        metavar="RUN_ID",
        type=run_id_arg,
        help="continue an interrupted run from its latest manifest (same id, data and config)",
    )
    run.add_argument(
        "--output-dir", type=Path, default=Path("runs"), help="where --resume finds RUN_ID"
    )
    run.add_argument("--quiet", action="store_true", help="no live view; one line per step")


def run(args: argparse.Namespace) -> int:
    # Without this a SIGTERM would end the launcher on the spot and leave its services and
    # embedded servers running with no one to stop them.
    signal.signal(signal.SIGTERM, _stop)
    recipe, config, run_id, run_dir, plan = prepare(args)
    resume = resume_command(args, run_id, run_dir)
    try:
        checked = preflight.check(config, recipe)
    except preflight.PreflightFailed as failed:
        for problem in failed.problems:
            print(f"miles: {problem}", file=sys.stderr)
        print("miles: nothing was started; fix the above and run again", file=sys.stderr)
        return 2
    models.resolve(config)
    print("miles: checked " + "; ".join(checked), flush=True)
    servers: list[embedded.Server] = []
    children: list[Child] = []
    following: track.Follower | None = None
    started_ray = False
    try:
        # Each service gets its own user on the embedded servers (permissions.py); the
        # launcher keeps admin's URLs, which the services' config.json does not carry.
        if plan.embedded_nats:
            servers.append(embedded.start_nats(run_dir / "nats", run_id=run_id))
            config.infra.nats_url = servers[-1].url
        if plan.embedded_redis:
            servers.append(embedded.start_redis(run_dir / "redis", run_id=run_id))
            config.infra.redis_url = servers[-1].url
        if not config.infra.ray_address:
            config.infra.ray_address = raycluster.start_local(run_dir)
            started_ray = True
        assert config.infra.redis_url is not None
        client = launcher_client(config.infra.redis_url, config.infra.connect_timeout_seconds)
        outage = Outage(config.infra.outage_tolerance_seconds)

        def read_view() -> RunView:
            return outage.read(lambda: RunView.read(client, run_id), log=launcher_log)

        status = read_view().record.status if args.resume else None
        if status == "finished":
            print(f"miles: run {run_id} finished already; nothing to resume", flush=True)
            return 0
        if status == "drained":  # before any service reads it as "stop" (its coordinator too)
            client.hset(RunKeys(run_id).record, mapping={"status": "running", "drain_step": 0})
        config_path = run_dir / "config.json"
        config_path.write_text(embedded.for_services(config, servers).model_dump_json(indent=2))
        print(
            f"miles: run {run_id} in {run_dir}\n  nats {embedded.redact(config.infra.nats_url)}  "
            f"redis {embedded.redact(config.infra.redis_url)}  ray {config.infra.ray_address}",
            flush=True,
        )

        env = os.environ | {"RAY_ADDRESS": config.infra.ray_address, "PYTHONUNBUFFERED": "1"}
        ports = metrics_ports(config.infra.metrics_port)
        if ports:
            write_metrics_ports(run_dir, ports, config.infra.metrics_addr)
            print("  /metrics " + "  ".join(f"{s} :{p}" for s, p in ports.items()), flush=True)
        for service in SERVICES:
            argv = [
                sys.executable,
                "-m",
                "miles.cli",
                "serve",
                service,
                "--recipe",
                str(recipe.path),
                "--run-id",
                run_id,
                "--run-dir",
                str(run_dir),
                "--config",
                str(config_path),
            ]
            if ports:
                argv += ["--set", f"infra.metrics_port={ports[service]}"]
            own = env | embedded.service_env(run_dir, service)
            child = Child(service, argv, run_dir / "logs" / f"{service}.log", own)
            child.start()
            children.append(child)

        following = track.follower(config.tracking, run_id, run_dir, config)
        supervisor = Supervisor(
            children,
            servers,
            client,
            run_id,
            config.run.steps,
            outage,
            run_dir / "timeline.jsonl",
            following=following,
        )
        stopped = supervisor.run(quiet=args.quiet)
        view = read_view()
        if following is not None:
            following.update(view)
        summary = view.summary() | {
            "restarts": supervisor.restarts(),
            "os_processes_peak": supervisor.peak_processes,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        report.save_run(run_dir, view)
        loading = None
        if stopped is None:  # finished: the model out, while NATS and Redis are up
            exported = export.export_final(config, run_id, run_dir)
            summary["model"] = str(exported.path)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            loading = export.loading_hint(exported)
        LiveView.final(summary, run_dir, loading)
        if stopped is None:
            return 0
        print(ending_line(stopped, resume), flush=True)
        return DRAINED if view.record.status == "drained" else 1
    except RedisOutage as lost:
        print(ending_line(str(lost), resume), flush=True)
        return 1
    except KeyboardInterrupt as stop:
        name = str(stop) or "SIGINT"
        print("\n" + ending_line(f"{name} received", resume), flush=True)
        return 128 + getattr(stop, "signum", signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut cleanup short
        if following is not None:
            following.close()
        for child in children:
            child.stop()
        live_targets(run_dir).unlink(missing_ok=True)
        if started_ray:
            import ray

            ray.shutdown()
        for server in servers:
            server.stop()


@dataclass
class Supervisor:
    """Keeps the children and the embedded servers up until the coordinator finishes the run."""

    children: list[Child]
    servers: list[embedded.Server]
    client: redis.Redis
    run_id: str
    steps: int
    outage: Outage
    """How long Redis has been away: the supervisor rides out up to its tolerance."""
    timeline: Path | None = None
    peak_processes: int = 0
    server_restarts: dict[str, int] = field(default_factory=dict)
    following: track.Follower | None = None
    """The experiment trackers (``tracking``), fed each step and evaluation as they land."""
    first_step: int | None = None
    """The committed step when this launch first read the run; until a step commits after it,
    a service that exits with an error failed to start."""
    latest_step: int = 0

    def restarts(self) -> dict[str, int]:
        return {c.service: c.restarts for c in self.children} | self.server_restarts

    def run(self, quiet: bool) -> str | None:
        """None when the run finished; otherwise why it stopped before: a stop control event,
        or a service that keeps crashing."""
        coordinator = self.children[0]
        with LiveView(self.run_id, self.steps, quiet=quiet) as live:
            for tick in itertools.count():
                self.revive_servers(live)
                view = self.outage.attempt(self.read_view, live.log)
                if view is not None:
                    self.latest_step = view.step
                    self.first_step = view.step if self.first_step is None else self.first_step
                    live.update(view)
                    if self.following is not None:
                        self.following.update(view)
                    if self.timeline and tick % 4 == 0:  # every 2 s, for `miles report`
                        report.append_timeline(self.timeline, view)
                if tick % 20 == 0:
                    self.peak_processes = max(self.peak_processes, count_processes())
                for child in self.children:
                    assert child.process is not None
                    code = child.process.poll()
                    if code is None or (code == 0 and child is not coordinator):
                        continue  # running, or stopped on purpose (the run finished)
                    if child is coordinator and code == 0:
                        wait_for_exit(self.children[1:], timeout=30)
                        view = self.outage.read(
                            self.read_view, live.log, between=lambda: self.revive_servers(live)
                        )
                        live.update(view)
                        return why_unfinished(view.record, self.steps)
                    given_up = self.restart(child, code, live)
                    if given_up is not None:
                        return given_up
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def read_view(self) -> RunView:
        return RunView.read(self.client, self.run_id)

    @property
    def starting(self) -> bool:
        return self.first_step is None or self.latest_step <= self.first_step

    def restart(self, child: Child, code: int, live: LiveView) -> str | None:
        """Restart a crashed service (when its backoff is up); or say why not: it failed to
        start twice, or crashed too often in a row."""
        if time.monotonic() < child.next_start:
            return None
        if code > 0 and self.starting:  # an error, not a kill, before the run got going
            live.log(f"{child.service} failed to start (exit code {code}); its log ends:")
            live.log(log_tail(child.log_path))
            if child.restarts >= 1:
                live.log(f"{child.service} failed to start twice: stopping the run.")
                return f"{child.service} failed to start twice (fix the error above)"
        if time.monotonic() - child.started > 60:  # it ran a good while: a fresh failure
            child.backoff = 1.0
            child.streak = 0
        child.restarts += 1
        child.streak += 1
        self.count_restart(child.service)
        live.log(
            f"{child.service} exited with code {code}; restart #{child.restarts} "
            f"(log: {child.log_path})"
        )
        if child.streak > 5:
            live.log(f"{child.service} crashed {child.streak} times in a row; giving up")
            return (
                f"{child.service} crashed {child.streak} times in a row, last with exit code "
                f"{code} (log: {child.log_path})"
            )
        child.next_start = time.monotonic() + child.backoff
        child.backoff = min(child.backoff * 2, 30)
        child.start()
        return None

    def revive_servers(self, live: LiveView) -> None:
        """An embedded server that died restarts on the same port, store and AOF."""
        for server in self.servers:
            code = server.process.poll()
            if code is not None:
                self.server_restarts[server.name] = self.server_restarts.get(server.name, 0) + 1
                live.log(f"{server.name} exited with code {code}; restarting on its own store")
                server.restart()
                self.count_restart(server.name)

    def count_restart(self, name: str) -> None:
        """Into the run record, where the coordinator exports it (``miles_restarts_total``);
        not counted while Redis is away (the supervisor's reads say so)."""
        with contextlib.suppress(*UNREACHABLE):
            self.client.hincrby(RunKeys(self.run_id).restarts, name, 1)


def launcher_log(message: str) -> None:
    """A line from the launcher before (or after) the live view."""
    print(f"miles: {message}", flush=True)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a service's log, indented, for the terminal."""
    try:
        text = path.read_bytes()[-16_384:].decode(errors="replace")
    except OSError as exc:
        return f"    (cannot read {path}: {exc})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def metrics_ports(port: int | None) -> dict[str, int]:
    """Each service's /metrics port: for ``infra.metrics_port`` 0, free ports (picked once, so
    a restarted service keeps its port and Prometheus its target); for P, P, P+1, ... in
    service order (deploy/'s 9101-9105 with P = 9101); for None, none."""
    if port is None:
        return {}
    if port:
        return {service: port + i for i, service in enumerate(SERVICES)}
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in SERVICES]
        for probe in probes:  # held open together, so the five ports differ
            probe.bind(("", 0))
        return {s: probe.getsockname()[1] for s, probe in zip(SERVICES, probes, strict=True)}


def write_metrics_ports(run_dir: Path, ports: dict[str, int], addr: str) -> None:
    """``metrics_ports.json`` (service -> port) and ``prometheus_targets.json``, a Prometheus
    file_sd target list, in the run dir; and the same list as ``<runs>/prometheus_targets/
    <run_id>.json`` while the run goes, which ``deploy/prometheus/local.yml`` scrapes."""
    host = "127.0.0.1" if addr in ("0.0.0.0", "", "::") else addr
    (run_dir / "metrics_ports.json").write_text(json.dumps(ports, indent=2))
    targets = [{"targets": [f"{host}:{port}"], "labels": {"job": s}} for s, port in ports.items()]
    (run_dir / "prometheus_targets.json").write_text(json.dumps(targets, indent=2))
    live_targets(run_dir).parent.mkdir(exist_ok=True)
    live_targets(run_dir).write_text(json.dumps(targets, indent=2))


def live_targets(run_dir: Path) -> Path:
    return run_dir.parent / "prometheus_targets" / f"{run_dir.name}.json"


def wait_for_exit(children: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for child in children:
        assert child.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))


def count_processes() -> int:
    """This process and all its descendants: services, embedded servers, Ray and its workers."""
    return len(family(os.getpid()))


def family(pid: int) -> set[int]:
    """``pid`` and every live process descended from it (read from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    members = {pid}
    grew = True
    while grew:
        before = len(members)
        members |= {child for child, parent in parents.items() if parent in members}
        grew = len(members) > before
    return members
