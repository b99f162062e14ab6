"""The file's order is its architecture: sections under banners, in the order data flows, and no code
that reaches forward into a later section."""

import ast
import re

from conftest import PIXELD

SECTIONS = [
    "Configuration", "Data model", "Request parsing", "User-agent reducer", "Hits", "Other trackers", "Privacy", "Storage", "Writer", "Queries", "Report",
    "Export and import", "Snippet", "WSGI app", "Server", "Service", "Digest and alerts", "Command line",
]


def banners(lines):
    """(first line, title) of every section banner."""
    return [(number, line.strip("# ").strip()) for number, line in enumerate(lines, 1) if re.match(r"^# [A-Z].*#####$", line)]


def bound_locally(node):
    """The names a function or class binds itself (parameters, assignments, loop and comprehension targets)."""
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            names.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            names.add(sub.id)
    return names


def test_the_sections_come_in_the_order_data_flows():
    titles = [title for _, title in banners(PIXELD.read_text().splitlines())]
    assert len(titles) == len(SECTIONS) and all(title.startswith(expected) for title, expected in zip(titles, SECTIONS)), titles


def test_no_code_uses_a_name_defined_in_a_later_section():
    source = PIXELD.read_text()
    starts = [number for number, _ in banners(source.splitlines())]

    def section(line):
        return sum(1 for start in starts if start <= line)

    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else getattr(node, "targets", [getattr(node, "target", None)])
        for target in targets:
            name = getattr(target, "name", None) or getattr(target, "id", None)
            if name:
                defined.setdefault(name, node.lineno)
    forward = []
    for node in tree.body:
        local = bound_locally(node) if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id in defined and sub.id not in local:
                if section(defined[sub.id]) > section(node.lineno):
                    forward.append(f"line {sub.lineno} uses {sub.id} (line {defined[sub.id]})")
    assert forward == []
