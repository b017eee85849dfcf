"""The package boundaries of docs/architecture.md hold: every `dsv3` import (module level or inside a
function) goes to the same package or to one the table there lists, and the packages below the plan
never touch torch.distributed. The table is read from the page itself, so the page and this check
cannot drift apart."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DISTRIBUTED = ("dsv3/config", "dsv3/kernels", "dsv3/model", "dsv3/fp8", "dsv3/data")


def allowed_imports() -> dict[str, set[str]]:
    """`dsv3/<pkg>` -> the packages it may import, from the table of section 2."""
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        section = f.read().split("## 2.")[1].split("\n## ")[0]
    table = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(dsv3(?:/\w+)?)`(?: \(top-level modules\))?", cells[0]) if len(cells) == 3 else None
        if m:
            table[m.group(1)] = set(re.findall(r"`(\w+)`", cells[2]))
    return table


def imports_of(path: str) -> list[tuple[str, int]]:
    """(dotted module, line) of every import in a file; relative imports resolved."""
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(f"{base}.{a.name}" if base == "dsv3" else base, node.lineno) for a in node.names]
    return found


def test_every_dsv3_import_stays_inside_the_documented_boundaries():
    table = allowed_imports()
    assert {"dsv3/config", "dsv3/model", "dsv3/train", "dsv3"} <= set(table), table
    problems = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "dsv3")):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, ROOT)
            parts = rel.split(os.sep)
            owner = "dsv3" if len(parts) == 2 else f"dsv3/{parts[1]}"
            if owner not in table:
                problems.append(f"{rel}: package {owner} is not in docs/architecture.md's table: add its row")
                continue
            for module, line in imports_of(path):
                if module.startswith("torch.distributed") and owner in NO_DISTRIBUTED:
                    problems.append(f"{rel}:{line} imports {module}: {owner} must not know about processes")
                if not module.startswith("dsv3.") or module == "dsv3._dispatch_ext":
                    continue
                target = module.split(".")[1]
                if f"dsv3/{target}" != owner and target not in table[owner] and f"dsv3/{target}" in table:
                    problems.append(f"{rel}:{line} imports {module}; {owner} may import {sorted(table[owner]) or 'no package'}")
                elif f"dsv3/{target}" not in table and owner != "dsv3" and target not in table[owner]:
                    problems.append(f"{rel}:{line} imports {module}, a top-level module {owner} may not import")
    assert not problems, "\n".join(problems)
