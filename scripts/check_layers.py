"""Check that gpurun's imports follow its layers (README, "Layout of the code"; the table is ALLOWED).

A module's layer is its first name under gpurun (gpurun.app.launch: app).
A layer may import what the table lists for it and, through those, what
they may import (so `errors` is everywhere); `--literal` reads the table
without that. Modules outside the table (paths, durations, sizes,
ssh_config, ...) are utilities: any layer may use them, and they may use
errors and each other. `python -m gpurun` (__main__) may import cli.
Imports under TYPE_CHECKING and inside functions count too. Prints each
import that breaks the table; exit status 1 if there is one.

Second rule: app/ (and cli.py) asks a provider what it can do, never which
one it is. A comparison there with a provider's name ("aws", "ssh", "local")
is a violation: ask gpurun.providers.capabilities instead.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ALLOWED = {
    "errors": set(),
    "spec": {"errors"},
    "store": {"errors"},
    "providers": {"errors", "spec"},
    "transport": {"errors"},
    "sync": {"transport"},
    "jobs": {"transport", "store"},  # store.documents: the schema of agent.status.json
    "agent": {"store"},
    "runs": {"spec", "store"},
    "app": {"errors", "spec", "store", "providers", "transport", "sync", "jobs", "agent", "runs"},
    "cli": {"app", "ui"},
    "ui": {"app"},
    "__main__": {"cli"},
}


PROVIDER_NAMES = {"aws", "ssh", "local"}


def provider_branches(path: Path) -> list[int]:
    """Lines of `path` that compare with a provider's name (`x == "aws"`, `x in ("ssh", "local")`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names: set[str] = set()
        for operand in operands:
            elements = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            names |= {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        if names & PROVIDER_NAMES:
            found.append(node.lineno)
    return found


def check_provider_branches(root: Path) -> list[str]:
    app = root / "app"
    problems = []
    deciders = sorted(app.rglob("*.py")) if app.is_dir() else []
    deciders += [root / "cli.py"] if (root / "cli.py").is_file() else []
    for path in deciders:
        lines = provider_branches(path)
        if lines:
            where = ", ".join(str(line) for line in lines)
            problems.append(
                f"{path}: {len(lines)} provider-name branch(es) (lines {where}); "
                "ask the provider's capabilities (gpurun.providers.capabilities) instead"
            )
    return problems


def closure(allowed: dict[str, set[str]]) -> dict[str, set[str]]:
    reach = {name: set(below) for name, below in allowed.items()}
    changed = True
    while changed:
        changed = False
        for below in reach.values():
            more = set().union(*(reach.get(name, set()) for name in below)) - below
            if more:
                below |= more
                changed = True
    return reach


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gpurun"


def imported(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) for each gpurun module the file imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "gpurun"]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "gpurun":
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                sub = root.parent / name.replace(".", "/")
                is_module = sub.is_dir() or sub.with_suffix(".py").exists()
                found.append((node.lineno, name if is_module else node.module))
    return found


def main() -> int:
    args = [arg for arg in sys.argv[1:] if arg != "--literal"]
    allowed = ALLOWED if "--literal" in sys.argv else closure(ALLOWED)
    root = Path(args[0] if args else "gpurun")
    violations = []
    utility_uses: dict[str, set[str]] = defaultdict(set)
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.with_suffix("").relative_to(root.parent).parts)
        mine = layer(module)
        for line, target in imported(path, root):
            theirs = layer(target)
            if theirs == mine or theirs == "gpurun":
                continue
            if mine not in allowed:  # a utility
                utility_uses[mine].add(target)
                ok = theirs == "errors" or theirs not in allowed
            else:
                ok = theirs not in allowed or theirs in allowed[mine]
            if not ok:
                violations.append(f"{path}:{line}: {mine} imports {target} ({theirs})")
    for name, targets in sorted(utility_uses.items()):
        print(f"utility {name} imports: {', '.join(sorted(targets))}")
    violations += check_provider_branches(root)
    print("\n".join(dict.fromkeys(violations)) or "no layer violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
