"""Put the notebook's file names and source lines back into remote tracebacks.

cloudpickle ships code with its file name replaced by ``<dynamic-code>``, so a
worker's traceback says ``File "<dynamic-code>", line 3, in mapfunc`` and shows
no source. The master still has the original code objects: a frame whose
function name and line fall inside exactly one of them gets that code's file
name and the line from this process's linecache (where IPython keeps cells).
"""

from __future__ import annotations

import inspect
import linecache
import re
from typing import Any, NamedTuple

DYNAMIC = re.compile(r'^(?P<indent>\s*)File "<dynamic-code>", line (?P<line>\d+), in (?P<name>.+)$')


class CodeSpan(NamedTuple):
    name: str
    filename: str
    first: int
    last: int


def code_spans(func: Any, limit: int = 200) -> list[CodeSpan]:
    """Where the code ``func`` may run came from: itself, nested code, and the
    functions it reaches through its globals and closure (what cloudpickle ships)."""
    spans: list[CodeSpan] = []
    for obj in _reachable_functions(func, limit):
        codes = [obj.__code__]
        while codes:
            code = codes.pop()
            lines = [line for _, _, line in code.co_lines() if line is not None]
            spans.append(CodeSpan(code.co_name, code.co_filename, code.co_firstlineno, max(lines, default=0)))
            codes.extend(c for c in code.co_consts if inspect.iscode(c))
    return spans


def point_back(func: Any, spans: list[CodeSpan]) -> Any:
    """Give ``func`` (unpickled from cloudpickle bytes), its nested code and the functions it
    reaches the file names of the code they were pickled from, so that a traceback, ``%debug``
    or a breakpoint in it shows the cell's source lines. Returns ``func``."""
    files = {(s.name, s.first): s.filename for s in spans}

    def fix(code: Any) -> Any:
        consts = tuple(fix(c) if inspect.iscode(c) else c for c in code.co_consts)
        filename = code.co_filename
        if filename == "<dynamic-code>":
            filename = files.get((code.co_name, code.co_firstlineno), filename)
        return code.replace(co_filename=filename, co_consts=consts)

    for obj in _reachable_functions(func):
        obj.__code__ = fix(obj.__code__)
    return func


def _reachable_functions(func: Any, limit: int = 200) -> list:
    found: list = []
    seen: set[int] = set()
    todo = [func]
    while todo and len(found) < limit:
        obj = todo.pop()
        obj = getattr(obj, "__func__", getattr(obj, "func", obj))
        if id(obj) in seen or not inspect.isfunction(obj):
            continue
        seen.add(id(obj))
        found.append(obj)
        try:
            closure = inspect.getclosurevars(obj)
        except (TypeError, ValueError):
            continue
        todo.extend(v for v in (*closure.nonlocals.values(), *closure.globals.values()) if callable(v))
    return found


def restore(traceback_text: str, spans: list[CodeSpan]) -> str:
    """``traceback_text`` with ``<dynamic-code>`` frames pointed back at their cells."""
    out = []
    for line in traceback_text.splitlines():
        m = DYNAMIC.match(line)
        if m:
            lineno, name = int(m["line"]), m["name"]
            hits = {s.filename for s in spans if s.name == name and s.first <= lineno <= s.last}
            if len(hits) == 1:
                filename = hits.pop()
                out.append(f'{m["indent"]}File "{filename}", line {lineno}, in {name}')
                source = linecache.getline(filename, lineno).strip()
                if source:
                    out.append(f'{m["indent"]}  {source}')
                continue
        out.append(line)
    return "\n".join(out) + "\n"
