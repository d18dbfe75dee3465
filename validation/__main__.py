"""`python -m validation STACK_OR_DIR ...`: render (or read) manifests and run every validation layer.

    python -m validation prod                      # render Pulumi.prod.yaml, then validate
    python -m validation examples/Pulumi.x.yaml    # any stack file
    python -m validation out/prod                  # a folder of YAML, e.g. from `python render.py prod --out`
    python -m validation --all                     # every stack file of the repo

Prints one table of findings per target and a summary per layer; exits 1 when anything fails, 2 when a
stack's config is invalid or checkov is not installed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from validation.checkov_runner import CheckovError, check_skip_file, lws_pod_templates, run_checkov
from validation.crds import check_crds
from validation.crossref import check_crossref
from validation.findings import Finding
from validation.manifests import discover_stack_files, read_dir, render, stack_label, write_dir
from validation.schemas import KUBERNETES_VERSIONS, check_schemas

LAYERS = ("schemas", "crds", "checkov", "crossref")


def validate_target(target: str, versions: tuple[str, ...]) -> tuple[int, list[Finding]]:
    """(manifest count, findings) for a stack name, a stack file or a folder of YAML."""
    path = Path(target)
    with tempfile.TemporaryDirectory(prefix="validation-") as scratch:
        manifests = read_dir(path) if path.is_dir() else render(target)
        # checkov scans a scratch copy, with each LeaderWorkerSet's pod templates beside it as PodTemplates.
        directory = Path(scratch)
        write_dir(manifests + lws_pod_templates(manifests), directory)
        findings = check_schemas(manifests, versions) + check_crds(manifests) + check_crossref(manifests)
        findings += run_checkov(directory).findings()
    return len(manifests), findings


def print_table(title: str, count: int, findings: list[Finding], stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    print(f"== {title}: {count} manifests", file=stream)
    for layer in LAYERS:
        n = sum(f.layer == layer for f in findings)
        print(f"   {layer:<9} {'PASS' if n == 0 else f'FAIL ({n})'}", file=stream)
    if not findings:
        return
    rows = [("LAYER", "CHECK", "RESOURCE", "PROBLEM")] + [(f.layer, f.check, f.resource, f.message)
                                                          for f in sorted(findings)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("   " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3], file=stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="stack name (prod), stack file, or folder of rendered YAML")
    parser.add_argument("--all", action="store_true", help="every Pulumi.*.yaml and examples/*.yaml stack")
    parser.add_argument("--k8s-version", action="append", dest="versions",
                        help=f"Kubernetes schema version (repeatable; default {' and '.join(KUBERNETES_VERSIONS)})")
    args = parser.parse_args(argv)
    targets = list(args.targets) + ([str(p) for p in discover_stack_files()] if args.all else [])
    if not targets:
        parser.error("name a stack, a stack file or a folder, or pass --all")
    versions = tuple(args.versions or KUBERNETES_VERSIONS)
    from llm_platform.config import ConfigError

    failed = False
    skip_problems = check_skip_file()
    if skip_problems:
        print_table(".checkov.yaml", 0, skip_problems)
        failed = True
    for target in targets:
        title = stack_label(Path(target).resolve()) if target.endswith((".yaml", ".yml")) else target
        try:
            count, findings = validate_target(target, versions)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except CheckovError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print_table(title, count, findings)
        failed = failed or bool(findings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
