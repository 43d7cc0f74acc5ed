#!/usr/bin/env python3
"""Fails if modules in one directory of a crate import each other in a cycle.

For every directory of Rust sources, each file is a module; a module depends on a sibling when
its code (comments stripped) names it as `super::x`, `crate::x` or `crate::parent::x`. A cycle
among siblings is reported with its path. `make lint` runs this.
"""

import os
import re
import sys

ROOTS = ["filter/src", "wasmhost/src", "msi/src", "emulator/src", "host/src", "tests/src", "tests/probe/src"]
REFERENCE = re.compile(r"\b(?:super|crate(?:::[a-z_]+)?)::([a-z_][a-z0-9_]*)")
ENTRY_POINTS = {"main.rs", "lib.rs", "tests.rs"}


def siblings(directory):
    return {
        name[:-3]: os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.endswith(".rs") and name not in ENTRY_POINTS
    }


def dependencies(files):
    graph = {}
    for name, path in files.items():
        with open(path, encoding="utf-8") as source:
            text = re.sub(r"//[^\n]*", "", source.read())
        graph[name] = {d for d in REFERENCE.findall(text) if d in files and d != name}
    return graph


def find_cycle(graph):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, stack + [dep])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def main():
    failed = False
    for root in sys.argv[1:] or ROOTS:
        for directory, _, _ in os.walk(root):
            files = siblings(directory)
            cycle = find_cycle(dependencies(files))
            if cycle:
                print(f"module cycle in {directory}: {' -> '.join(cycle)}")
                failed = True
    if failed:
        sys.exit(1)
    print("module cycles: none")


if __name__ == "__main__":
    main()
