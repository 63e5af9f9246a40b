#!/usr/bin/env python3
"""Checks ARCHITECTURE.md's crate table against `cargo metadata`.

Every workspace crate must have a row, and each row must name exactly the
crate's normal (not dev or build) dependencies on other Courier crates.
"""
import json
import pathlib
import subprocess
import sys

root = pathlib.Path(__file__).resolve().parent.parent
metadata = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--locked"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
)
names = {p["name"] for p in metadata["packages"]}
actual = {
    p["name"]: {d["name"] for d in p["dependencies"] if d["kind"] is None and d["name"] in names}
    for p in metadata["packages"]
}

documented = {}
in_table = False
for line in (root / "ARCHITECTURE.md").read_text().splitlines():
    if line.startswith("| crate | depends on |"):
        in_table = True
        continue
    if in_table:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("---"):
            continue
        deps = set() if cells[1] in ("—", "") else {d.strip() for d in cells[1].split(",")}
        documented[cells[0]] = deps

problems = []
if not documented:
    problems.append("no '| crate | depends on |' table found")
for name in sorted(actual):
    if name not in documented:
        problems.append(f"{name}: no row (it depends on {', '.join(sorted(actual[name])) or 'nothing of ours'})")
    elif documented[name] != actual[name]:
        problems.append(
            f"{name}: the table says {', '.join(sorted(documented[name])) or '—'}; "
            f"Cargo.toml says {', '.join(sorted(actual[name])) or '—'}"
        )
for name in sorted(set(documented) - set(actual)):
    problems.append(f"{name}: a row for a crate the workspace does not have")
if problems:
    print("ARCHITECTURE.md's crate table is out of date (fix the table and the drawing above it):")
    for p in problems:
        print("  " + p)
    sys.exit(1)
print(f"crate graph: {len(actual)} crates as ARCHITECTURE.md says")
