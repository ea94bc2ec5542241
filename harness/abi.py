"""Do the ctypes mirrors match the C structs they mirror? Every field's offset and size, every
struct's size and alignment, fields added or missing, as the compiler lays them out.

llama-cpp-python's bindings are hand-written ctypes copies of llama.h's structs, passed by value
(llama_model_params, llama_context_params) or by pointer; harness.driver mirrors the head of
struct ggml_tensor itself. A copy that disagrees with the header the library was built from hands
libllama shifted fields: on the CPU build, fields a CPU load never reads (devices, tensor split,
main GPU, ...) can be wrong unnoticed. This check compiles a small C program against the patched
headers of the build (the pinned source plus native/fake-quant.patch), which prints offsetof and
sizeof of every member of every mirrored struct, and compares it with the ctypes layout.

    python -m harness abi [--backend cpu|vulkan|cuda]     (exit 1 on any difference)
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import source as sources
from harness.build import PATCH, Build, apply_patch
from harness.cache import HarnessError, cache_root, publish, sha256_file
from harness.pins import LLAMA_CPP_PYTHON


def headers() -> Path:
    """The patched public headers (include/, ggml/include/), made once per source and patch."""
    key = f"{LLAMA_CPP_PYTHON.sha256[:12]}-{sha256_file(PATCH)[:12]}"

    def make(tmp: Path) -> None:
        src = sources.extract(sources.locate(), tmp / "src", only=sources.HEADER_DIRS)
        apply_patch(src, include=sources.HEADER_DIRS)
        for d in sources.HEADER_DIRS:
            shutil.copytree(src / d, tmp / d, dirs_exist_ok=True)
        shutil.rmtree(tmp / "src")

    return publish(cache_root() / "headers" / key, make)


@dataclass(frozen=True)
class Member:
    name: str
    union: int | None = None  # index of the anonymous union it belongs to


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside braces and parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _declarators(decl: str) -> list[str]:
    if m := re.search(r"\(\s*\*\s*(\w+)\s*\)\s*\(", decl):  # function pointer
        return [m[1]]
    names = []
    for piece in _split_top(decl, ","):
        if ":" in piece:
            raise HarnessError(f"bit-field {piece!r}: offsetof cannot check it")
        m = re.search(r"(\w+)\s*(\[[^\]]*\]\s*)*$", piece)
        if m is None:
            raise HarnessError(f"cannot read the member name of {piece!r}")
        names.append(m[1])
    return names


def struct_members(header: str, name: str) -> list[Member] | None:
    """The members of `struct name { ... }` in a header's text, in order (None: no such struct);
    members of an anonymous union carry its index."""
    text = _strip_comments(header)
    m = re.search(rf"\bstruct\s+{re.escape(name)}\s*\{{", text)
    if m is None:
        return None
    depth, i = 1, m.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    members: list[Member] = []
    unions = 0
    for decl in _split_top(text[m.end():i - 1], ";"):
        if "{" in decl:
            head, inner = decl.split("{", 1)
            inner, tail = inner.rsplit("}", 1)
            if tail.strip():  # a named nested struct or union: one member
                members.append(Member(_declarators(tail)[0]))
            elif head.strip() == "union":
                members += [Member(n, unions) for d in _split_top(inner, ";") for n in _declarators(d)]
                unions += 1
            else:
                raise HarnessError(f"struct {name}: anonymous {head.strip()} not handled")
        else:
            members += [Member(n) for n in _declarators(decl)]
    return members


@dataclass
class Layout:
    """What the C compiler gives: struct size and alignment, each member's offset and size."""

    size: int
    align: int
    fields: dict[str, tuple[int, int]]


def c_layouts(structs: dict[str, list[Member]], include_dirs: list[Path]) -> dict[str, Layout]:
    """Compile and run a program printing offsetof/sizeof of every member of `structs`."""
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "llama.h"', "int main(void) {"]
    for s, members in structs.items():
        lines.append(f'    printf("%s * %zu %zu\\n", "{s}", sizeof(struct {s}), _Alignof(struct {s}));')
        for m in members:
            lines.append(f'    printf("%s %s %zu %zu\\n", "{s}", "{m.name}", offsetof(struct {s}, {m.name}), '
                         f'sizeof(((struct {s} *)0)->{m.name}));')
    lines += ["    return 0;", "}"]
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise HarnessError("the ABI check needs a C compiler (cc)")
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "layout.c"
        program.write_text("\n".join(lines) + "\n")
        compiled = subprocess.run([cc, "-std=c11", *(f"-I{d}" for d in include_dirs), str(program), "-o",
                                   str(Path(tmp) / "layout")], capture_output=True, text=True)
        if compiled.returncode != 0:
            raise HarnessError(f"the layout program does not compile:\n{compiled.stderr[-3000:]}")
        out = subprocess.run([str(Path(tmp) / "layout")], capture_output=True, text=True, check=True).stdout
    layouts: dict[str, Layout] = {}
    for line in out.splitlines():
        s, field, a, b = line.split()
        if field == "*":
            layouts[s] = Layout(int(a), int(b), {})
        else:
            layouts[s].fields[field] = (int(a), int(b))
    return layouts


@dataclass(frozen=True)
class Difference:
    struct: str
    field: str   # "*" for the struct as a whole
    what: str


def compare(mirror: type[ctypes.Structure], members: list[Member], layout: Layout,
            prefix: bool = False) -> list[Difference]:
    """Differences between a ctypes mirror and the C layout of its struct. `prefix`: the mirror
    copies only the leading members (its own size and alignment are not compared)."""
    s = mirror.__name__
    out: list[Difference] = []
    c_names = [m.name for m in members]
    unions: dict[int, list[str]] = {}
    for m in members:
        if m.union is not None:
            unions.setdefault(m.union, []).append(m.name)
    seen: list[str] = []  # C members the mirror covers, in the mirror's order
    for entry in mirror._fields_:
        name, ctype = entry[0], entry[1]
        py = getattr(mirror, name)
        union_members = next((names for names in unions.values() if isinstance(ctype, type)
                              and issubclass(ctype, ctypes.Union) and [f[0] for f in ctype._fields_] == names), None)
        if name in layout.fields and name in c_names:
            offset, size = layout.fields[name]
            seen.append(name)
        elif union_members is not None:  # a named ctypes Union standing for an anonymous C union
            offset = layout.fields[union_members[0]][0]
            size = max(layout.fields[n][1] for n in union_members)
            seen += union_members
        else:
            out.append(Difference(s, name, f"in the mirror, not in struct {s}"))
            continue
        if (py.offset, py.size) != (offset, size):
            out.append(Difference(s, name, f"offset/size {py.offset}/{py.size} in the mirror, {offset}/{size} in C"))
    expected = c_names[:len(seen)] if prefix else c_names
    out += [Difference(s, n, f"in struct {s}, not in the mirror") for n in expected if n not in seen]
    if not prefix and (ctypes.sizeof(mirror), ctypes.alignment(mirror)) != (layout.size, layout.align):
        out.append(Difference(s, "*", f"size/alignment {ctypes.sizeof(mirror)}/{ctypes.alignment(mirror)} in the "
                                      f"mirror, {layout.size}/{layout.align} in C"))
    return out


def mirrors(module) -> list[type[ctypes.Structure]]:
    """The ctypes Structures of `module` that declare fields, in name order."""
    return sorted((v for v in vars(module).values() if isinstance(v, type) and issubclass(v, ctypes.Structure)
                   and v is not ctypes.Structure and v.__dict__.get("_fields_")), key=lambda v: v.__name__)


def check(build: Build) -> tuple[list[str], list[Difference]]:
    """Every struct the bindings (bound to `build`) and the driver mirror, against the patched
    headers: (the structs compared, their differences)."""
    from harness import driver

    llama = driver.bind(build)
    include = headers()
    header_dirs = [include / d for d in sources.HEADER_DIRS]
    llama_h = (include / "include" / "llama.h").read_text()
    ggml_h = (include / "ggml" / "include" / "ggml.h").read_text()
    pairs = []  # (mirror, C struct name, members, prefix)
    for mirror in mirrors(llama):
        members = struct_members(llama_h, mirror.__name__)
        if members is None:
            raise HarnessError(f"the bindings mirror struct {mirror.__name__}, which llama.h does not have")
        pairs.append((mirror, mirror.__name__, members, False))
    for mirror, c_name, prefix in driver.MIRRORS:
        members = struct_members(ggml_h if c_name.startswith("ggml_") else llama_h, c_name)
        if members is None:
            raise HarnessError(f"harness.driver mirrors struct {c_name}, which the headers do not have")
        pairs.append((mirror, c_name, members, prefix))
    layouts = c_layouts({c: m for _, c, m, _ in pairs}, header_dirs)
    differences = [d for mirror, c, members, prefix in pairs for d in compare(mirror, members, layouts[c], prefix)]
    return [f"{mirror.__name__} (struct {c}{', leading members' if prefix else ''})" for mirror, c, _, prefix in pairs], \
        differences


if __name__ == "__main__":  # python -m harness.abi BACKEND: in a process of its own (bind once)
    import sys

    from harness.build import build

    compared, found = check(build(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
    print(f"{len(compared)} structs compared: {', '.join(compared)}")
    for d in found:
        print(f"DIFFERS {d.struct}.{d.field}: {d.what}")
    sys.exit(1 if found else 0)
