#!/usr/bin/env python3
"""Checks the direction of the arrows between the crate's modules (ARCHITECTURE.md).

Reads every `crate::…`, `super::…` and `self::…` path in `src/` (use lines and paths in
code; comments, strings and `#[cfg(test)]` code left out) and fails when:

- a part imports what it may not: core imports nothing outside core (no door, no call
  path, no store implementation, no upstream, no metrics exporter, no wiring); the store
  implementations import core only; upstream imports core only; the call path imports core
  and upstream; a door (`rest`, `grpc`) imports neither the other door nor `store`, only
  core, the call path, the edge module and the metrics exporter; the alerts (`notify`)
  and the scheduled backups (`backup`) import core only; the simulator imports nothing
  of the gateway;
- files import each other in a circle (a module's own `mod.rs` wiring its children is
  the module tree, not an import, and is left out).

Usage: scripts/check-architecture.py [SRC_DIR]     (default: src next to this script)
       scripts/check-architecture.py --self-test   (shows that each rule can fail)
"""

import os
import re
import sys
import tempfile

# What each top-level part may import besides itself. A part not listed (the wiring:
# app, server, config, cli, admin_client, main, lib) may import anything.
ALLOWED = {
    "core": set(),
    "store": {"core"},
    "upstream": {"core"},
    "call": {"core", "upstream", "cache"},
    "cache": {"core"},
    "edge": {"core", "metrics"},
    "rest": {"core", "call", "edge", "metrics"},
    "grpc": {"core", "call", "edge", "metrics"},
    "console": {"core", "call", "edge"},
    "metrics": {"core"},
    "notify": {"core"},
    "backup": {"core"},
    "sim": set(),
}

WHY = {
    "core": "core owns the ports and knows no door, call path, store, upstream, exporter or wiring",
    "store": "a store implementation depends on core only",
    "upstream": "upstream depends on core only",
    "call": "the call path depends on core, upstream and the cache only",
    "cache": "the response cache knows answers by their keys and depends on core only",
    "edge": "the edge module is below the doors",
    "rest": "a door depends on core, the call path, edge and metrics; never on the other door or store",
    "grpc": "a door depends on core, the call path, edge and metrics; never on the other door or store",
    "console": "a door depends on core, the call path and edge; never on another door or store",
    "metrics": "the exporter listens to core's events; it depends on core only",
    "notify": "the alerts watch core's events and answer through its notifier port; they know no door",
    "backup": "scheduled backups use core's export; they know no door and no store implementation",
    "sim": "the simulator stands alone",
}


def strip_code(text):
    """Text without comments, string and char literals (replaced by spaces/empty)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if text[i] == "\n":
                        out.append("\n")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 12]):
            m = re.match(r"'(\\[^']*|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0)) if m else 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def drop_test_items(code):
    """`code` without `#[cfg(test)]` items (test modules and their bodies)."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", code):
        if m.start() < i:
            continue
        out.append(code[i:m.start()])
        j = m.end()
        # The item ends at its `;` or at the brace that closes its body.
        depth = 0
        while j < len(code):
            if code[j] == "{":
                depth += 1
            elif code[j] == "}":
                depth -= 1
                if depth == 0:
                    j += 1
                    break
            elif code[j] == ";" and depth == 0:
                j += 1
                break
            j += 1
        i = j
    out.append(code[i:])
    return "".join(out)


def test_only_modules(code):
    """Names of file modules declared under `#[cfg(test)]`."""
    return set(re.findall(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", code))


def use_trees(code):
    """Every path a `use` declaration names, expanded (`a::{b, c::d}` → a::b, a::c::d)."""
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", code):
        paths.extend(expand(m.group(1).replace("\n", " ")))
    return paths


def expand(tree):
    tree = tree.strip()
    brace = tree.find("{")
    if brace < 0:
        return [re.split(r"\s+as\s+", tree)[0].strip()]
    prefix = tree[:brace]
    inner = tree[brace + 1:tree.rfind("}")]
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(inner):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:k])
            start = k + 1
    parts.append(inner[start:])
    out = []
    for part in parts:
        if part.strip():
            out.extend(prefix + p for p in expand(part))
    return out


class Crate:
    def __init__(self, src):
        self.src = src
        self.files = {}  # module path (tuple) -> file path
        self.excluded = set()
        self._find(os.path.join(src, "lib.rs"), ())
        main = os.path.join(src, "main.rs")
        if os.path.exists(main):
            self.files[("main",)] = main

    def _find(self, path, module):
        self.files[module] = path
        code = strip_code(open(path, encoding="utf-8").read())
        tests = test_only_modules(code)
        folder = os.path.dirname(path) if os.path.basename(path) in ("lib.rs", "mod.rs", "main.rs") \
            else os.path.splitext(path)[0]
        for name in re.findall(r"(?:^|[\s;}])(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", code):
            child = None
            for candidate in (os.path.join(folder, name + ".rs"), os.path.join(folder, name, "mod.rs")):
                if os.path.exists(candidate):
                    child = candidate
            if child is None:
                continue
            if name in tests:
                self.excluded.add(module + (name,))
                continue
            self._find(child, module + (name,))

    def owner(self, path):
        """The longest module prefix of `path` that is a file of its own."""
        for k in range(len(path), -1, -1):
            if tuple(path[:k]) in self.files:
                return tuple(path[:k])
        return ()

    def references(self, module):
        """(target module, text) for each crate path the file's non-test code names."""
        file = self.files[module]
        is_dir_module = os.path.basename(file) in ("mod.rs", "lib.rs")
        code = drop_test_items(strip_code(open(file, encoding="utf-8").read()))
        paths = use_trees(code)
        without_uses = re.sub(r"\buse\s+[^;]+;", " ", code)
        paths += re.findall(r"(?<![\w:])((?:crate|super|self)(?:::\w+)+)", without_uses)
        # Re-exports of a module's own children are the module tree, not imports.
        reexports = set()
        for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", code):
            reexports.update(expand(m.group(1).replace("\n", " ")))
        out = []
        for text in paths:
            segments = [s for s in text.split("::") if s]
            if not segments:
                continue
            if segments[0] == "crate":
                target = segments[1:]
            elif segments[0] == "self":
                target = list(module) + segments[1:]
            elif segments[0] == "super":
                base, rest = list(module), segments
                while rest and rest[0] == "super":
                    base, rest = base[:-1], rest[1:]
                target = base + rest
            else:
                continue
            target_module = self.owner(target)
            if target_module in self.excluded:
                continue
            child_of_self = target_module[: len(module)] == module and target_module != module
            if child_of_self and (is_dir_module or text in reexports):
                continue
            out.append((target_module, text))
        return out


def part(module):
    return module[0] if module else "lib"


def check(src):
    crate = Crate(src)
    problems = []
    graph = {}
    for module in sorted(crate.files):
        graph[module] = set()
        for target, text in crate.references(module):
            if target == module:
                continue
            graph[module].add(target)
            mine, theirs = part(module), part(target)
            if mine in ALLOWED and theirs != mine and theirs not in ALLOWED[mine]:
                problems.append(
                    f"{crate.files[module]}: `{text}`: {mine} may not import {theirs} ({WHY[mine]})"
                )
    for circle in circles(graph):
        names = " -> ".join(crate.files[m] for m in circle + [circle[0]])
        problems.append(f"import circle: {names}")
    return problems


def circles(graph):
    """The strongly connected components with more than one file (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def self_test():
    """Builds small crates that break each rule and checks that each is caught."""
    cases = {
        "clean": ({
            "lib.rs": "pub mod core;\npub mod rest;\npub mod app;\n",
            "core/mod.rs": "pub mod a;\npub mod b;\npub use a::A;\n",
            "core/a.rs": "use super::b::B; // crate::rest::X in a comment\npub struct A;\n",
            "core/b.rs": 'pub struct B; const S: &str = "crate::rest::X";\n#[cfg(test)]\nmod tests { use crate::rest::X; }\n',
            "rest/mod.rs": "mod chat;\nuse crate::core::A;\npub struct S;\n",
            "rest/chat.rs": "use super::S;\n",
            "app.rs": "use crate::rest::S;\nuse crate::core::a::A;\n",
        }, []),
        "core imports a door": ({
            "lib.rs": "pub mod core;\npub mod rest;\n",
            "core/mod.rs": "pub fn f() { crate::rest::g(); }\n",
            "rest/mod.rs": "pub fn g() {}\n",
        }, ["core may not import rest"]),
        "core imports the store implementation": ({
            "lib.rs": "pub mod core;\npub mod store;\n",
            "core/mod.rs": "use crate::store::{SledStore, writer::UsageWriter};\n",
            "store/mod.rs": "pub mod writer;\npub struct SledStore;\n",
            "store/writer.rs": "pub struct UsageWriter;\n",
        }, ["core may not import store", "core may not import store"]),
        "a door imports the other door": ({
            "lib.rs": "pub mod core;\npub mod rest;\npub mod grpc;\n",
            "core/mod.rs": "",
            "rest/mod.rs": "pub struct ModelLabel;\n",
            "grpc/mod.rs": "mod chat;\n",
            "grpc/chat.rs": "use crate::{core, rest::ModelLabel};\n",
        }, ["grpc may not import rest"]),
        "the alerts import a door": ({
            "lib.rs": "pub mod core;\npub mod notify;\npub mod rest;\n",
            "core/mod.rs": "",
            "notify/mod.rs": "use crate::core::Gateway;\nuse crate::rest::AppState;\n",
            "rest/mod.rs": "pub struct AppState;\n",
        }, ["notify may not import rest"]),
        "sibling files in a circle": ({
            "lib.rs": "pub mod core;\n",
            "core/mod.rs": "pub mod keys;\npub mod records;\n",
            "core/keys.rs": "use super::records::now;\npub fn hex() {}\n",
            "core/records.rs": "pub fn now() { super::keys::hex(); }\n",
        }, ["import circle"]),
    }
    failures = 0
    for name, (files, expected) in cases.items():
        with tempfile.TemporaryDirectory() as root:
            for path, text in files.items():
                full = os.path.join(root, path)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "w", encoding="utf-8") as f:
                    f.write(text)
            problems = check(root)
        unmatched = list(problems)
        for e in expected:
            hit = next((p for p in unmatched if e in p), None)
            if hit is not None:
                unmatched.remove(hit)
        if len(problems) != len(expected) or unmatched:
            failures += 1
            print(f"self-test `{name}`: expected {expected}, got {problems}")
    if failures:
        sys.exit(1)
    print(f"check-architecture self-test: {len(cases)} cases, each rule caught")


def main():
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    problems = check(os.path.normpath(src))
    for p in problems:
        print(p)
    if problems:
        print(f"check-architecture: {len(problems)} problem(s); see ARCHITECTURE.md", file=sys.stderr)
        sys.exit(1)
    print("check-architecture: the arrows point the right way and no files import each other in a circle")


if __name__ == "__main__":
    main()
