"""Render a stack's exact Kubernetes manifests without a cluster or the Pulumi CLI (like `helm template`).

    python render.py STACK --out DIR          # reads Pulumi.STACK.yaml
    python render.py path/to/Pulumi.x.yaml --out DIR

The Pulumi program (`__main__.py`) runs in-process under Pulumi's mocks; every resource it registers is
captured with its exact inputs and written as one YAML document per file. Whole numbers are written as
integers, and Secret values never in plain text. Bad config exits 2 with the program's own message.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import yaml

ROOT = Path(__file__).resolve().parent
PROJECT = "llm-platform"
REDACTED = "<redacted: set by pulumi up>"
KIND_ORDER = {kind: i for i, kind in enumerate([
    "Namespace", "PriorityClass", "RuntimeClass", "ResourceQuota", "LimitRange", "NetworkPolicy", "ServiceAccount",
    "Secret", "ConfigMap", "PersistentVolumeClaim", "Service", "Deployment", "StatefulSet",
    "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress", "ServiceMonitor", "PrometheusRule",
])}
# Marker the Pulumi SDK uses for a secret value on the wire.
_SECRET_SIG = "4dabf18193072939515e22adb298388d"


@dataclass
class Captured:
    """One registered resource: its Pulumi type token, logical name and exact inputs."""

    type: str
    name: str
    inputs: dict[str, Any]
    parent: str | None = None
    ignore_changes: list[str] = field(default_factory=list)
    depends_on: list[str] = field(default_factory=list)
    """URNs of the resources this one was registered to wait for."""
    custom_timeouts: dict[str, str] = field(default_factory=dict)
    alias_parents: list[str] = field(default_factory=list)
    """Earlier parents (URNs) whose child of the same name the engine maps onto this resource."""

    @property
    def is_kubernetes(self) -> bool:
        return self.type.startswith("kubernetes:") and "kind" in self.inputs

    @property
    def kind(self) -> str:
        return self.inputs.get("kind", self.type.rsplit(":", 1)[-1])

    @property
    def metadata_name(self) -> str:
        return self.inputs.get("metadata", {}).get("name", self.name)


@dataclass
class RenderResult:
    stack: str
    resources: list[Captured] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: set[str] = field(default_factory=set)

    def manifests(self) -> list[dict[str, Any]]:
        """Every Kubernetes manifest, in a stable install order (cluster objects first, workloads late)."""
        found = [to_manifest(r.inputs) for r in self.resources if r.is_kubernetes]
        return sorted(found, key=lambda m: (KIND_ORDER.get(m["kind"], len(KIND_ORDER)), m["kind"],
                                            m["metadata"].get("namespace", ""), m["metadata"]["name"]))

    def helm_releases(self) -> list[dict[str, Any]]:
        """Helm releases (pulumi_kubernetes Release): chart, version, repository, namespace and values."""
        return [_clean(r.inputs) for r in self.resources if r.type == "kubernetes:helm.sh/v3:Release"]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests() if m["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [m for m in self.of_kind(kind) if name is None or m["metadata"]["name"] == name]
        if len(found) != 1:
            raise LookupError(f"expected one {kind} {name or ''}, found {len(found)}")
        return found[0]


def _mocks_class():
    import pulumi

    class RecordingMocks(pulumi.runtime.Mocks):
        """Records every resource registration; returns inputs as outputs (plus a fake random result)."""

        def __init__(self):
            self.resources: list[Captured] = []

        def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
            self.resources.append(Captured(args.typ, args.name, dict(args.inputs)))
            outputs = dict(args.inputs)
            if args.typ.startswith("random:"):
                # A deterministic stand-in: the real value only ever exists in Pulumi state.
                outputs["result"] = f"mock-{args.name}-" + "x" * int(args.inputs.get("length", 16))
            return f"{args.name}-id", outputs

        def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:  # type: ignore[override]
            # The program makes no provider calls; the SDK also takes a bare dict of outputs here.
            return {}

    class RecordingMonitor(pulumi.runtime.mocks.MockMonitor):
        """Also records each registration's options (parent, dependencies, timeouts, aliases), so tests can check
        that components parent their children and order them."""

        def __init__(self, mocks):
            super().__init__(mocks)
            self.requests: dict[tuple[str, str], Any] = {}

        def RegisterResource(self, request):
            self.requests[(request.type, request.name)] = request
            return super().RegisterResource(request)

    return RecordingMocks, RecordingMonitor


def stack_file(stack_or_path: str) -> tuple[str, Path]:
    """Resolve `prod` or a path to a stack file into (stack name, path)."""
    path = Path(stack_or_path)
    if path.suffix in (".yaml", ".yml") and not path.exists() and (ROOT / path).exists():
        path = ROOT / path
    if path.suffix in (".yaml", ".yml") and path.exists():
        match = re.match(r"Pulumi\.(.+)\.ya?ml$", path.name)
        return (match.group(1) if match else path.stem), path
    path = ROOT / f"Pulumi.{stack_or_path}.yaml"
    if not path.exists():
        stacks = sorted(p.name[len("Pulumi."):-len(".yaml")] for p in ROOT.glob("Pulumi.*.yaml"))
        raise SystemExit(f"error: no stack file {path.name}; known stacks: {', '.join(stacks)}")
    return stack_or_path, path


def read_stack_config(path: Path) -> dict[str, str]:
    """Stack file `config:` as the flat string map the Pulumi CLI hands a program."""
    document = yaml.safe_load(path.read_text()) or {}
    config = document.get("config") or {}
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            raise SystemExit(f"error: {path.name}: {key} is an encrypted secret; render cannot decrypt it. "
                             "Use `pulumi config set --secret` only for values the program reads as secrets.")
        flat[key] = value if isinstance(value, str) else json.dumps(value)
    return flat


def run_with_mocks(stack: str, config: dict[str, str], program: Callable[[], Any]) -> RenderResult:
    """Run `program` under recording mocks with this stack config; return every resource and stack output."""
    import pulumi
    from pulumi.runtime import settings as runtime_settings
    from pulumi.runtime.stack import run_pulumi_func
    from pulumi.runtime.sync_await import _sync_await

    _ensure_event_loop()
    mocks_class, monitor_class = _mocks_class()
    mocks = mocks_class()
    monitor = monitor_class(mocks)
    pulumi.runtime.set_all_config(config)
    # A fresh root Stack per run, so several renders in one process (the tests) do not share outputs.
    runtime_settings.set_root_resource(None)  # type: ignore[arg-type]  # no root yet: the run creates it
    runtime_settings.SETTINGS.outputs.clear()
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    _sync_await(run_pulumi_func(program))
    for captured in mocks.resources:
        request = monitor.requests.get((captured.type, captured.name))
        if request is None:
            continue
        captured.parent = request.parent or None
        captured.ignore_changes = list(request.ignoreChanges)
        captured.depends_on = list(request.dependencies)
        timeouts = request.customTimeouts
        captured.custom_timeouts = {k: getattr(timeouts, k) for k in ("create", "update", "delete")
                                    if getattr(timeouts, k)}
        captured.alias_parents = [a.spec.parentUrn for a in request.aliases if a.spec.parentUrn]
    result = RenderResult(stack=stack, resources=mocks.resources)
    root = pulumi.runtime.get_root_resource()
    for key, value in getattr(root, "outputs", {}).items():
        output = pulumi.Output.from_input(value)
        result.outputs[key] = _sync_await(output.future())
        if _sync_await(output.is_secret()):
            result.secret_outputs.add(key)
    return result


def _ensure_event_loop() -> None:
    """Pulumi's runtime drives its RPCs on the thread's current event loop; code that ran `asyncio.run` before
    (a test, an embedding program) leaves none, or a closed one."""
    import asyncio
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loop = asyncio.get_event_loop()
        if not loop.is_closed():
            return
    except RuntimeError:
        pass
    asyncio.set_event_loop(asyncio.new_event_loop())


def run_program(stack: str, config: dict[str, str]) -> RenderResult:
    """Run the project's `__main__.py` (the real program) under mocks."""
    def program():
        sys.path.insert(0, str(ROOT))
        try:
            runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")
        finally:
            sys.path.remove(str(ROOT))

    return run_with_mocks(stack, config, program)


def render_stack(stack_or_path: str) -> RenderResult:
    stack, path = stack_file(stack_or_path)
    return run_program(stack, read_stack_config(path))


def to_manifest(inputs: dict[str, Any]) -> dict[str, Any]:
    """Captured inputs -> a clean manifest: whole floats to ints, secret values redacted, nulls dropped."""
    manifest = _clean(inputs)
    if manifest.get("kind") == "Secret":
        for section in ("data", "stringData"):
            if section in manifest:
                manifest[section] = {k: REDACTED for k in manifest[section]}
    return manifest


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        if _SECRET_SIG in value:
            # A secret on the wire: keep a map's keys (a Secret's stringData), never its values.
            inner = value.get("value")
            return {k: REDACTED for k in inner} if isinstance(inner, dict) else REDACTED
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def dump_yaml(manifest: dict[str, Any]) -> str:
    """Keys sorted at every level (apiVersion, kind, metadata, spec come first by themselves): stable diffs."""
    return yaml.safe_dump(manifest, sort_keys=True, default_flow_style=False)


def write_manifests(result: RenderResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.yaml"):
        old.unlink()
    written = []
    for index, manifest in enumerate(result.manifests(), start=1):
        name = f"{index:02d}-{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        path = out / name
        path.write_text(dump_yaml(manifest))
        written.append(path)
    helm_dir = out / "helm"
    if helm_dir.exists():
        for old in helm_dir.glob("*.yaml"):
            old.unlink()
    for release in result.helm_releases():
        helm_dir.mkdir(exist_ok=True)
        path = helm_dir / f"{release['name']}.yaml"
        path.write_text(dump_yaml(release))
        written.append(path)
    return written


def print_summary(result: RenderResult, written: list[Path], out: Path, stream: TextIO = sys.stdout) -> None:
    manifests = result.manifests()
    rows = [(m["kind"], m["metadata"].get("namespace", "-"), m["metadata"]["name"]) for m in manifests]
    widths = [max(len(r[i]) for r in rows + [("KIND", "NAMESPACE", "NAME")]) for i in range(3)]
    print(f"stack {result.stack}: {len(manifests)} manifests written to {out}", file=stream)
    for row in [("KIND", "NAMESPACE", "NAME")] + rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)), file=stream)
    for release in result.helm_releases():
        source = (release.get("repositoryOpts") or {}).get("repo") or release["chart"]
        print(f"  helm release {release['name']} {release['version']} from {source} "
              f"into {release['namespace']} (values in {out / 'helm'})", file=stream)
    plan = result.outputs.get("capacityPlan") or {}
    if plan:
        print("capacity plan:", file=stream)
        for model_plan in plan.values():
            for line in model_plan["summary"]:
                print(f"  {line}", file=stream)
    shown = {k: v for k, v in result.outputs.items() if k not in result.secret_outputs and k != "capacityPlan"}
    for key, value in shown.items():
        print(f"output {key}: {json.dumps(value)}", file=stream)
    for key in sorted(result.secret_outputs):
        print(f"output {key}: [secret]", file=stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stack", help="stack name (dev, staging, prod) or a Pulumi.<stack>.yaml path")
    parser.add_argument("--out", type=Path, required=True, help="folder for the rendered YAML")
    args = parser.parse_args(argv)
    os.environ.setdefault("PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION", "true")
    from llm_platform.config import ConfigError

    try:
        result = render_stack(args.stack)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = write_manifests(result, args.out)
    print_summary(result, written, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
