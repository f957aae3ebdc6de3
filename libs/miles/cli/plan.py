"""`miles plan`: choose the training and rollout parallelism for a model on a cluster.

Inputs resolve in order: the model and GPU presets, then the flags, then ``--set field=value``
(any field of the cluster, the model or the options; ``model.num_layers=40`` or just
``num_layers=40``). Standalone: ``python -m miles.cli.plan --model llama3-8b --gpus 8``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.table import Table

from miles.config import apply_overrides
from miles.planner import (
    GPU_PRESETS,
    MODEL_PRESETS,
    Cluster,
    ModelSpec,
    Plan,
    PlanError,
    PlanOptions,
    build_plan,
)

SECTIONS: dict[str, type[BaseModel]] = {
    "cluster": Cluster,
    "model": ModelSpec,
    "options": PlanOptions,
}


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to a parent parser's subparsers."""
    parser = subparsers.add_parser(
        "plan",
        help="choose TP/PP/CP/DP/EP for training and SGLang engines for rollout",
        description="Enumerate valid parallel layouts, keep those that fit in GPU memory, "
        "rank them by estimated step time and explain the choice.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=sorted(MODEL_PRESETS))
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in total (default 8)")
    parser.add_argument("--nodes", type=int, help="nodes (default: GPUs / 8, at least 1)")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPU_PRESETS), help="GPU type")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: the GPU's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's)")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, help="sequences per forward/backward")
    parser.add_argument("--mode", choices=["colocated", "split"], help="default colocated")
    parser.add_argument("--rollout-fraction", type=float, help="share of GPUs for rollout (split)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any cluster, model or option field, e.g. num_layers=40 or mfu=0.35",
    )
    parser.add_argument("--top", type=int, default=12, help="table rows to show (default 12)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON only")


def resolve_inputs(args: argparse.Namespace) -> tuple[ModelSpec, Cluster, PlanOptions]:
    """Presets, then flags, then --set; validated once at the end."""
    if args.gpus < 1 or (args.nodes is not None and not 1 <= args.nodes <= args.gpus):
        raise ValueError("--gpus must be positive and --nodes between 1 and --gpus")
    gpus_per_node = args.gpus // args.nodes if args.nodes else min(args.gpus, 8)
    nodes = args.gpus // gpus_per_node
    if nodes * gpus_per_node != args.gpus:
        raise ValueError(f"--gpus {args.gpus} is not a whole number of {gpus_per_node}-GPU nodes")
    cluster = GPU_PRESETS[args.gpu].model_dump() | {"nodes": nodes, "gpus_per_node": gpus_per_node}
    flags = {
        ("cluster", "gpu_memory_gib"): args.gpu_memory,
        ("model", "seq_length"): args.seq_len,
        ("options", "global_batch"): args.global_batch,
        ("options", "micro_batch"): args.micro_batch,
        ("options", "mode"): args.mode,
        ("options", "rollout_fraction"): args.rollout_fraction,
    }
    data: dict[str, Any] = {
        "cluster": cluster,
        "model": MODEL_PRESETS[args.model].model_dump(),
        "options": {},
    }
    for (section, field), value in flags.items():
        if value is not None:
            data[section][field] = value
    apply_overrides(data, [_qualified(item) for item in args.overrides])
    return (
        ModelSpec.model_validate(data["model"]),
        Cluster.model_validate(data["cluster"]),
        PlanOptions.model_validate(data["options"]),
    )


def _qualified(override: str) -> str:
    """``num_layers=40`` -> ``model.num_layers=40``; a bare name must belong to one section."""
    key, sep, value = override.partition("=")
    section, dot, field = key.rpartition(".")
    owners = [name for name, spec in SECTIONS.items() if field in spec.model_fields]
    if not sep or (dot and section not in owners) or not owners:
        fields = sorted(f for spec in SECTIONS.values() for f in spec.model_fields)
        raise ValueError(f"--set {override!r}: expected FIELD=VALUE, FIELD one of {fields}")
    return f"{section or owners[0]}.{field}={value}"


def run(args: argparse.Namespace) -> int:
    try:
        plan = build_plan(*resolve_inputs(args))
    except ValueError as exc:  # PlanError, a bad --set, or pydantic's ValidationError
        kind = "no plan" if isinstance(exc, PlanError) else "invalid input"
        if args.json:
            print(json.dumps({"error": str(exc)}))
        else:
            print(f"miles plan: {kind}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(plan.model_dump_json(indent=2))
    else:
        print_plan(plan, Console(), args.top)
    return 0


def print_plan(plan: Plan, console: Console, top: int) -> None:
    model, cluster, options = plan.model, plan.cluster, plan.options
    console.print(
        f"[bold]{model.name}[/]: {model.total_params / 1e9:.1f}B parameters "
        f"({model.active_params / 1e9:.1f}B active), {model.seq_length} tokens × "
        f"{options.global_batch} sequences per step, on {cluster.nodes} × "
        f"{cluster.gpus_per_node} GPUs of {cluster.gpu_memory_gib:g} GiB ({options.mode}; "
        f"training on {plan.train_gpus})"
    )
    console.print(_candidate_table(plan, top))
    console.print(_rollout_table(plan))
    for line in plan.explanation:
        console.print(line, highlight=False)
        console.print()


def _candidate_table(plan: Plan, top: int) -> Table:
    fitting = sum(candidate.fits for candidate in plan.candidates)
    table = Table(
        title=f"training layouts: {fitting} of {len(plan.candidates)} fit in "
        f"{plan.usable_gib:.1f} GiB (fastest first; showing {min(top, len(plan.candidates))})",
        caption="GiB per GPU on the busiest pipeline stage; +full/+selective: activation "
        "recomputation; → chosen, ✗ does not fit",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("layout", no_wrap=True)
    for column in ("weights", "grads", "optim", "activ", "total", "step s", "vs best"):
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    best = plan.choice.time.total_s
    for candidate in plan.candidates[:top]:
        memory, layout = candidate.memory, candidate.layout
        chosen = candidate == plan.choice
        mark = "→" if chosen else (" " if candidate.fits else "✗")
        recompute = "" if layout.recompute == "none" else f" +{layout.recompute}"
        gib = (
            memory.weights_gib,
            memory.gradients_gib,
            memory.optimizer_gib,
            memory.activations_gib,
            memory.total_gib,
        )
        table.add_row(
            f"{mark} {layout.label()}{recompute}",
            *(f"{value:.1f}" for value in gib),
            f"{candidate.time.total_s:.2f}",
            f"{candidate.time.total_s / best - 1:+.1%}" if candidate.fits else "",
            style="bold green" if chosen else (None if candidate.fits else "dim"),
        )
    return table


def _rollout_table(plan: Plan) -> Table:
    rollout = plan.rollout
    table = Table(title="rollout (SGLang)")
    for column in ("GPUs", "engine TP", "engines", "weights", "KV cache", "total", "usable"):
        table.add_column(column, justify="right")
    table.add_row(
        str(rollout.gpus),
        str(rollout.engine_tp),
        str(rollout.engines),
        f"{rollout.memory.weights_gib:.1f}",
        f"{rollout.memory.kv_cache_gib:.1f}",
        f"{rollout.memory.total_gib:.1f}",
        f"{rollout.usable_gib:.1f}",
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="miles plan", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
