#!/usr/bin/env python3
"""How the source reads: import cycles at every level, the longest functions, and the call path a
reader follows from an entry point. Run from the repository root (or pass it):

    python3 scripts/code_map.py [ROOT] [--entry FILE:FN ...] [--expand MODULE ...] [--min-lines N]

The call path is static and heuristic (no type inference): from each entry function it follows
calls to the crate's own functions whose module starts with one of the --expand prefixes (the
orchestration a newcomer reads: by default `cli::train` and `train`), and counts — without
following them — its first calls into any other module (`--expand train::*` takes a module
with its submodules). A call resolves by `Type::name`,
`module::name`, a bare `name` defined in the same file or imported, or `.name` when the crate
defines one method of that name on a type the caller's file names (ambiguous ones are left
out); `--min-lines N` leaves out functions shorter than N lines (accessors). "Returns up" counts the
times the reading goes back to a shallower file than the one it just left (after a callee's
calls, the next call comes from a caller higher on the stack, in another file).
"""

import os
import re
import sys
from collections import defaultdict

KEYWORDS = {
    "if", "while", "for", "match", "loop", "return", "fn", "let", "move", "in", "as", "Some",
    "Ok", "Err", "None", "Box", "Vec", "String", "Self", "self", "super", "crate", "where",
    "unsafe", "impl", "struct", "enum", "mod", "use", "pub", "type", "const", "static", "dyn",
}


def strip(src):
    """Comments, strings and char literals blanked (lengths and newlines kept)."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', src[i:i + 10]) and not src[i - 1:i].isalnum():
            hashes = re.match(r'r(#*)"', src[i:]).group(1)
            end = src.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", src[i:j + 1]))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", src[i:i + 4]):
            m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:])
            out.append(" " * len(m.group(0)))
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(path):
    rel = os.path.relpath(path, "src")[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return "::".join(rel)


def matching_brace(text, open_at):
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(text) - 1


class Fn:
    def __init__(self, name, owner, module, path, start, end, body):
        self.name, self.owner, self.module, self.path = name, owner, module, path
        self.start, self.end, self.body = start, end, body

    @property
    def key(self):
        return f"{self.module}::{self.owner + '::' if self.owner else ''}{self.name}"

    @property
    def lines(self):
        return self.end - self.start + 1


def parse(root):
    fns, imports, files = [], {}, {}
    for dirpath, _, names in os.walk(os.path.join(root, "src")):
        for name in sorted(names):
            if not name.endswith(".rs"):
                continue
            path = os.path.relpath(os.path.join(dirpath, name), root)
            src = open(os.path.join(root, path)).read()
            text = strip(src)
            # Unit tests are not the path a reader follows.
            test_at = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
            if test_at:
                text = text[:test_at.start()]
            module = module_of(path)
            files[path] = module
            imports[path] = re.findall(r"\buse\s+([^;]+);", text) + re.findall(
                r"\b((?:crate|super)(?:::\w+)+)", text)
            impls = [(m.start(), matching_brace(text, m.end() - 1), m.group(1))
                     for m in re.finditer(
                         r"\bimpl\b(?:<[^>{]*>)?\s*(?:[\w:<>, ']+\s+for\s+)?([A-Za-z_]\w*)[^{;]*\{",
                         text)]
            impls += [(m.start(), matching_brace(text, m.end() - 1), m.group(1))
                      for m in re.finditer(r"\btrait\s+(\w+)[^{;]*\{", text)]
            for m in re.finditer(r"\bfn\s+(\w+)\b[^;{]*\{", text):
                open_at = m.end() - 1
                close = matching_brace(text, open_at)
                owner = ""
                for (a, b, ty) in impls:
                    if a < m.start() < b:
                        owner = ty
                start = src.count("\n", 0, m.start()) + 1
                end = src.count("\n", 0, close) + 1
                fns.append(Fn(m.group(1), owner, module, path, start, end, text[open_at:close]))
    # Closures' and nested fns' bodies are part of their parent: drop fns nested in another fn.
    return fns, imports, files


def module_edges(imports, files):
    """Edges between modules (as paths of module names) from `use` and inline paths."""
    edges = set()
    for path, uses in imports.items():
        me = files[path].split("::") if files[path] else []
        for use in uses:
            use = re.sub(r"\s+", "", use)
            parts = use.split("::")
            if parts[0] == "crate":
                target = parts[1:]
            elif parts[0] == "super":
                base = list(me) if not path.endswith(("mod.rs", "lib.rs")) else list(me)
                # `super` of a file module is its parent; of a mod.rs, the grandparent.
                base = base[:-1] if not path.endswith("mod.rs") else base[:-1]
                while parts and parts[0] == "super":
                    parts = parts[1:]
                    if parts and parts[0] == "super":
                        base = base[:-1]
                target = base + parts
            elif parts[0] == "self":
                target = me + parts[1:]
            else:
                continue
            target = [t for t in target if re.match(r"^[a-z_][a-z0-9_]*$", t)]
            if target:
                edges.add((tuple(me), tuple(target)))
    return edges


def cycles(edges, known_modules):
    """For every parent module, the cycles among its children (strongly connected components
    of more than one child)."""
    known = set(known_modules)
    out = []
    parents = {m[:-1] for m in known} | {()}
    for parent in sorted(parents):
        depth = len(parent)
        graph = defaultdict(set)
        for a, b in edges:
            if a[:depth] != parent or b[:depth] != parent:
                continue
            if len(a) <= depth or len(b) <= depth:
                continue
            ca, cb = a[depth], b[depth]
            # Only real child modules, not items of the parent.
            if parent + (cb,) not in known or parent + (ca,) not in known or ca == cb:
                continue
            graph[ca].add(cb)
        for scc in tarjan(graph):
            if len(scc) > 1:
                out.append(("::".join(parent) or "crate", sorted(scc)))
    return out


def tarjan(graph):
    index, low, stack, on, result, counter = {}, {}, [], set(), [], [0]
    nodes = set(graph) | {v for vs in graph.values() for v in vs}

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            result.append(scc)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return result


def call_path(fns, entries, expand, min_lines):
    sources = {f.path: open(f.path).read() for f in fns}
    by_name = defaultdict(list)
    for f in fns:
        by_name[f.name].append(f)
    methods = defaultdict(list)
    for f in fns:
        if f.owner:
            methods[f.name].append(f)

    def resolve(caller, body):
        found = []
        for m in re.finditer(r"(?:(\b[A-Za-z_]\w*)::)?(\.)?\b([a-z_]\w*)\s*(?:::<[^>]*>)?\s*\(",
                             body):
            qual, dot, name = m.group(1), m.group(2), m.group(3)
            if name in KEYWORDS:
                continue
            cands = by_name.get(name, [])
            pick = []
            if qual and qual[0].isupper():
                q = caller.owner if qual == "Self" else qual
                pick = [c for c in cands if c.owner == q]
            elif qual in ("super", "self"):
                here = caller.module.split("::")
                if qual == "super" and not caller.path.endswith("mod.rs"):
                    here = here[:-1]
                pick = [c for c in cands if not c.owner and c.module == "::".join(here)]
            elif qual:
                pick = [c for c in cands if not c.owner and c.module.split("::")[-1] == qual]
            elif dot:
                # Only methods of types the caller's file names (no type inference).
                text = sources[caller.path]
                ms = [c for c in methods.get(name, [])
                      if c.owner == caller.owner or re.search(rf"\b{c.owner}\b", text)]
                same = [c for c in ms if c.owner == caller.owner]
                pick = same if len(same) == 1 else (ms if len(ms) == 1 else [])
            else:
                local = [c for c in cands if not c.owner and c.path == caller.path]
                pick = local or [c for c in cands if not c.owner and len(cands) == 1]
            if len(pick) == 1 and pick[0] is not caller and pick[0].lines >= min_lines:
                found.append(pick[0])
        return found

    seen, order = set(), []

    def walk(f, depth):
        seen.add(f.key)
        order.append((f, depth))
        if not any(f.module == p or (p.endswith("::*") and f.module.startswith(p[:-1]))
                   for p in expand):
            return
        for g in resolve(f, f.body):
            if g.key not in seen:
                walk(g, depth + 1)

    for entry in entries:
        file, name = entry.split(":")
        owner, _, fname = name.rpartition("::")
        match = [f for f in fns if f.path == file and f.name == fname and f.owner == owner]
        if not match:
            sys.exit(f"entry {entry} not found")
        if match[0].key not in seen:
            walk(match[0], 0)
    returns_up = 0
    stack = []
    for i, (f, depth) in enumerate(order):
        del stack[depth:]
        if i > 0:
            prev_file = order[i - 1][0].path
            caller_file = stack[depth - 1] if depth > 0 else None
            if caller_file and caller_file != prev_file and depth <= order[i - 1][1]:
                returns_up += 1
        stack.append(f.path)
    return order, returns_up


def main():
    args = sys.argv[1:]
    root = "."
    entries, expand, min_lines = [], [], 1
    while args:
        a = args.pop(0)
        if a == "--entry":
            entries.append(args.pop(0))
        elif a == "--expand":
            expand.append(args.pop(0))
        elif a == "--min-lines":
            min_lines = int(args.pop(0))
        else:
            root = a
    os.chdir(root)
    fns, imports, files = parse(".")
    modules = set()
    for module in files.values():
        parts = tuple(module.split("::")) if module else ()
        for i in range(1, len(parts) + 1):
            modules.add(parts[:i])
    found = cycles(module_edges(imports, files), modules)
    print("import cycles:", "none" if not found else "")
    for parent, scc in found:
        print(f"  in {parent}: {' <-> '.join(scc)}")
    for prefix in ("train", "model"):
        inside = [f for f in fns if f.module == prefix or f.module.startswith(prefix + "::")]
        longest = max(inside, key=lambda f: f.lines)
        print(f"longest function in {prefix}/: {longest.key} ({longest.lines} lines, {longest.path})")
    model_files = sorted(p for p in files if p.startswith("src/model/"))
    sizes = {p: sum(1 for _ in open(p)) for p in model_files}
    print("model/ files:", ", ".join(f"{os.path.basename(p)} {n}" for p, n in sizes.items()))
    if entries:
        order, returns_up = call_path(fns, entries, expand or ["cli::train", "train::*"], min_lines)
        paths = {f.path for f, _ in order}
        print(f"call path from {', '.join(entries)}: {len(order)} functions in {len(paths)} files, "
              f"{returns_up} returns up")
        for f, depth in order:
            print(f"  {'  ' * depth}{f.key} ({f.path}:{f.start}, {f.lines} lines)")


if __name__ == "__main__":
    main()
