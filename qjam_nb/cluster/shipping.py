"""Getting a call's function and params into bytes, or saying exactly why not.

Everything here runs before any worker is asked to do anything, so a closure
over an open file or a lock fails early, with the variable named. A mapfunc
that pickles to more than ``CAPTURE_WARN_BYTES`` (it captured big data, sent
to every worker on every call) gets a ``CaptureWarning`` naming the big
variables; the search for them runs only then, so normal calls pay nothing.
"""

from __future__ import annotations

import functools
import inspect
import operator
import pickle
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import cloudpickle

from ..codec import PLAIN_TYPES, Pickled, digest_of, dumps_for
from ..errors import CaptureWarning, MapFuncError, ShippingError
from ..formats import format_size

#: A pickled mapfunc over this size gets a CaptureWarning naming the big variables it captures.
CAPTURE_WARN_BYTES = 10 << 20
#: Captured variables at least this big (pickled) are named in that warning.
CAPTURE_NAME_BYTES = 1 << 20
#: How each role is called, for messages.
ARGUMENTS = {"mapfunc": "(params, slice)", "reduce": "(a, b)"}
#: Functions (code, role, defaults) already found callable with two arguments.
_GOOD_SIGNATURES: set = set()


def check_signature(func: Any, role: str = "mapfunc") -> None:
    """Refuse a function that cannot be called with two arguments: ``mapfunc(params, slice)``, ``reduce(a, b)``."""
    # Checked once per code and defaults: iterative loops call map often. (Not for wrappers:
    # their signature is their __wrapped__'s.)
    cacheable = isinstance(func, types.FunctionType) and not hasattr(func, "__wrapped__")
    if cacheable:
        token = (func.__code__, role, len(func.__defaults__ or ()), tuple(func.__kwdefaults__ or ()))
        if token in _GOOD_SIGNATURES:
            return
    args = ARGUMENTS.get(role, "(params, slice)")
    if not callable(func):
        raise MapFuncError(f"{role} must be a function of {args}, not a {type(func).__name__}")
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return  # some builtins have no signature: let them try
    try:
        signature.bind(None, [])
    except TypeError as exc:
        name = getattr(func, "__name__", role)
        raise MapFuncError(f"{role} must take two arguments, {args}; {name}{signature} cannot ({exc})") from None
    if cacheable:
        if len(_GOOD_SIGNATURES) > 256:
            _GOOD_SIGNATURES.clear()
        _GOOD_SIGNATURES.add(token)


def dumps_function(func: Callable, role: str = "mapfunc", by_value: tuple = ()) -> bytes:
    """cloudpickle ``func`` (by value for ``__main__`` and the given modules).

    A function that reaches only things that cannot change in place (numbers,
    strings, tuples of them, modules, other such functions) pickles the same
    until one of them is replaced: its last pickle is reused while they are
    all the very same objects (``_fingerprint``), saving ~40 µs a call.
    """
    fingerprint = None if by_value else _fingerprint(func)
    if fingerprint is not None:
        known = _PICKLED.get(id(func))
        if known is not None and known[0] is func and _same(known[1], fingerprint):
            return known[2]
    blob = _dumps_function(func, role, by_value)
    if fingerprint is not None and len(blob) <= _PICKLED_MAX_BYTES:
        if len(_PICKLED) >= 32:
            _PICKLED.clear()
        _PICKLED[id(func)] = (func, fingerprint, blob)
    return blob


#: id(function) -> (function, fingerprint, pickle), for functions whose pickle cannot change in place.
_PICKLED: dict[int, tuple] = {}
_PICKLED_MAX_BYTES = 1 << 20
_ATOMS = (*PLAIN_TYPES, type(Ellipsis), types.BuiltinFunctionType)


def _fingerprint(func: Any) -> list | None:
    """Every object ``func``'s pickle is made of, if none can change in place; else None."""
    if not isinstance(func, types.FunctionType) or cloudpickle.list_registry_pickle_by_value():
        return None
    out: list = []
    return out if _reach(func, out, set(), 0) else None


def _reach(value: Any, out: list, seen: set, depth: int) -> bool:
    out.append(value)
    if isinstance(value, _ATOMS):
        return True
    if isinstance(value, (tuple, frozenset)):
        return depth < 8 and all(_reach(v, out, seen, depth + 1) for v in value)
    if isinstance(value, types.ModuleType):
        return value.__name__ != "__main__"  # by reference: "import it there"
    if not isinstance(value, types.FunctionType) or depth > 8:
        return False
    if _by_reference(value):  # pickled as its module and name: what it reaches does not matter
        out += (value.__module__, value.__qualname__)
        return True
    if id(value) in seen:
        return True
    seen.add(id(value))
    if value.__dict__ or value.__annotations__ or value.__kwdefaults__:
        return False
    out += (value.__code__, value.__name__, value.__qualname__, value.__module__, value.__doc__)
    try:
        parts = [*(value.__defaults__ or ()), *(c.cell_contents for c in value.__closure__ or ())]
    except ValueError:  # an empty cell (a variable assigned later)
        return False
    names = value.__globals__
    parts += [names[name] for name in _global_names(value.__code__) if name in names]
    return all(_reach(v, out, seen, depth + 1) for v in parts)


def _by_reference(func: types.FunctionType) -> bool:
    """Whether cloudpickle names ``func`` by its module and qualified name instead of pickling its code: a
    function of an imported module (not ``__main__``) that the module still holds under that name. (The
    caller has checked that no module is registered to travel by value.) Such a pickle never changes,
    though the function's own globals might: ``slice_sums`` of an imported module, say, whose module-level
    constants include mutable objects."""
    module = sys.modules.get(func.__module__) if func.__module__ != "__main__" else None
    if module is None:
        return False
    found: Any = module
    for part in func.__qualname__.split("."):  # "<locals>" is not found: a nested function
        found = getattr(found, part, None)
    return found is func


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _dumps_function(func: Callable, role: str, by_value: tuple) -> bytes:
    for module in by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        blob = cloudpickle.dumps(func, protocol=5)
    except Exception as exc:
        raise ShippingError(explain_unpicklable(func, role, exc)) from exc
    else:
        if len(blob) > CAPTURE_WARN_BYTES:
            warn_big_captures(func, len(blob), role)
        return blob
    finally:
        for module in by_value:
            cloudpickle.unregister_pickle_by_value(module)


def warn_big_captures(func: Any, nbytes: int, role: str = "mapfunc") -> None:
    """Warn (``CaptureWarning``) that ``func`` pickles to ``nbytes``, naming the big variables it captures."""
    found = big_captures(func)
    named = ", ".join(f"{label} ({format_size(size)})" for label, size in found)
    because = f", because it uses {named}" if named else ""
    warnings.warn(
        f"{role} pickles to {format_size(nbytes)}, sent to every worker on every call{because}. "
        "Pass big data as the dataset instead (-d NAME in %%qjam_map, dataset= in map: it is sliced, and "
        "cached on the workers) or as params (-p NAME / params=), and take it from the function's arguments.",
        CaptureWarning,
        stacklevel=_user_stacklevel(),
    )


def _user_stacklevel() -> int:
    """``stacklevel`` for the user's own line: ``cluster.map(...)``, or the cell of a ``%%qjam_map``
    (past this package's frames and IPython's magic machinery)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (
        frame.f_globals.get("__name__", "").split(".")[0] in ("qjam_nb", "IPython")
        or frame.f_code.co_filename.startswith("<decorator-gen")
    ):
        frame, level = frame.f_back, level + 1
    return level


def big_captures(func: Any, at_least: int = CAPTURE_NAME_BYTES) -> list[tuple[str, int]]:
    """What ``func`` captures (closure cells, globals it uses, defaults; inside functions it uses too),
    as (where, pickled bytes), biggest first: those of ``at_least`` bytes, else the three biggest."""
    sizes: list[tuple[str, int]] = []
    _sizes(func, "", sizes, set(), at_least)
    big = [item for item in sizes if item[1] >= at_least]
    return sorted(big or sizes, key=lambda item: -item[1])[: None if big else 3]


def _sizes(func: Any, used_by: str, out: list, seen: set, at_least: int) -> None:
    if id(func) in seen:
        return
    seen.add(id(func))
    for label, value in _captured(func):
        where = f"{label} (used by {used_by})" if used_by else label
        size = pickled_size(value)
        if size >= at_least and (inspect.isfunction(value) or inspect.ismethod(value)):
            before = len(out)
            _sizes(value, label, out, seen, at_least)
            if any(s >= at_least for _, s in out[before:]):
                continue  # what makes it big is named inside it
        out.append((where, size))


def pickled_size(value: Any) -> int:
    """Bytes ``value`` takes to ship (out-of-band buffers counted, not copied); 0 if it cannot be pickled."""
    buffers: list = []
    try:
        blob = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:
        return 0
    return len(blob) + sum(b.raw().nbytes for b in buffers)


def dumps_params(params: Any) -> Pickled:
    """Pickle params once per call, reused for every worker, with their digest."""
    buffers: list = []
    try:
        data = dumps_for(params)(params, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        where = _find_bad_item(params)
        at = f" (at params{where})" if where else ""
        raise ShippingError(
            f"params cannot be pickled to travel to the workers{at}: {type(exc).__name__}: {exc}. "
            "Pass plain data (numbers, arrays, lists, dicts) as params."
        ) from exc
    data = pickle.PickleBuffer(data)
    return Pickled(data, buffers, digest_of(data, buffers))


def explain_unpicklable(func: Any, role: str, exc: Exception) -> str:
    found = find_unpicklable(func)
    if found is None:
        return (
            f"{role} cannot be pickled to travel to the workers: {type(exc).__name__}: {exc}"
        )
    path, value, error = found
    return (
        f"{role} cannot be shipped to the workers: it uses {path} "
        f"(a {type(value).__module__}.{type(value).__qualname__}), which cannot be pickled "
        f"({type(error).__name__}: {error}). Create it inside {role}, or pass the data it "
        "holds as params or dataset."
    )


def find_unpicklable(func: Any, _seen: set | None = None) -> tuple[str, Any, Exception] | None:
    """The first variable ``func`` captures that cloudpickle cannot pickle, with its path."""
    seen = _seen if _seen is not None else set()
    if id(func) in seen:
        return None
    seen.add(id(func))
    for label, value in _captured(func):
        try:
            cloudpickle.dumps(value, protocol=5)
            continue
        except Exception as error:
            if inspect.isfunction(value) or inspect.ismethod(value) or hasattr(value, "__dict__"):
                inner = find_unpicklable(value, seen)
                if inner is not None:
                    path, bad, err = inner
                    return f"{path}, used by {label}", bad, err
            return label, value, error
    return None


def _captured(func: Any) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    if inspect.ismethod(func):  # a bound method carries its object along
        items.append(("self", func.__self__))
        func = func.__func__
    target = getattr(func, "func", func)  # functools.partial
    for arg in getattr(func, "args", ()) if target is not func else ():
        items.append(("a partial() argument", arg))
    if inspect.isfunction(target):
        try:
            closure = inspect.getclosurevars(target)
        except (TypeError, ValueError):
            closure = None
        if closure is not None:
            items += [(f"the variable {name!r}", v) for name, v in closure.nonlocals.items()]
        names = target.__globals__
        # Names used by nested code too (comprehensions, lambdas, inner functions), as cloudpickle ships them.
        items += [(f"the global {name!r}", names[name]) for name in _global_names(target.__code__) if name in names]
        code, defaults = target.__code__, target.__defaults__ or ()
        argnames = code.co_varnames[: code.co_argcount]
        items += [(f"the default of argument {name!r}", v)
                  for name, v in zip(argnames[len(argnames) - len(defaults):], defaults, strict=True)]
        items += [(f"the default of argument {name!r}", v) for name, v in (target.__kwdefaults__ or {}).items()]
    elif hasattr(target, "__dict__"):
        items += [(f"the attribute {name!r}", v) for name, v in vars(target).items()]
    return items


@functools.lru_cache(maxsize=512)
def _global_names(code: types.CodeType) -> dict:
    """Names ``code`` and the code nested in it look up (in order, once each): its candidate globals."""
    names = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return names


def _find_bad_item(value: Any, depth: int = 0) -> str:
    if depth > 3:
        return ""
    if isinstance(value, dict):
        children = [(f"[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        children = [(f"[{i}]", v) for i, v in enumerate(value)]
    else:
        return ""
    for label, child in children:
        try:
            cloudpickle.dumps(child, protocol=5)
        except Exception:
            return label + _find_bad_item(child, depth + 1)
    return ""
