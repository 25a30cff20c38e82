"""Serialization, chosen in exactly one place.

Plain data travels with the C pickler (protocol 5): dill costs about 20 times as much on
plain data.  dill is used only for what pickle cannot carry by reference: lambdas,
closures, functions and classes defined in ``__main__`` or inside functions, and
instances of such classes.  The choice is made per message; the frame header records it.

Callables are encoded separately (see :func:`encode_callable`) so the pool can send a
function to a worker once and refer to it by a short id afterwards.
"""
from __future__ import annotations

import _thread
import importlib
import io
import pickle
import sys
import traceback
import types
from typing import Any, Callable, List, Tuple

import dill

from ._errors import SerializationError

PROTOCOL = 5

# Tags that open an encoded callable.
_TAG_PICKLE = b"P"
_TAG_DILL = b"D"
_TAG_NAME = b"N"


class _NeedsDill(Exception):
    """Raised inside the C pickler to switch a message to dill."""


def _local_or_main(obj: Any) -> bool:
    module = getattr(obj, "__module__", None)
    if module == "__main__" or module == "__mp_main__":
        return True
    qualname = getattr(obj, "__qualname__", "")
    return "<locals>" in qualname or "<lambda>" in qualname


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # pickle stores functions and classes by reference (module and name).  A worker
        # cannot look up `__main__.f` or a function local to another function, so those
        # (and instances of such classes) must go by value, which only dill can do.
        if isinstance(obj, (type, types.FunctionType)):
            if _local_or_main(obj):
                raise _NeedsDill
        elif _local_or_main(type(obj)):
            raise _NeedsDill
        return NotImplemented


def dumps(obj: Any) -> Tuple[bytes, bool]:
    """Serializes obj; returns (data, used_dill).

    Raises:
        SerializationError: neither pickle nor dill can serialize obj (the message says why).
    """
    buf = io.BytesIO()
    try:
        _Pickler(buf, PROTOCOL).dump(obj)
        return buf.getvalue(), False
    except _NeedsDill:
        pass
    except Exception:  # noqa: BLE001 - any failure of the fast path falls back to dill
        pass
    try:
        return dill.dumps(obj, protocol=PROTOCOL, recurse=True), True
    except Exception as exc:  # noqa: BLE001 - reported to the caller, typed
        raise SerializationError(f"cannot serialize {_describe(obj)}: "
                                 f"{type(exc).__name__}: {exc}") from exc


class _Parts(list):
    """A file whose writes are kept as they come: the C pickler hands objects of 64 KiB
    or more to write() as they are, so big payloads are never copied into one buffer."""

    write = list.append


class _Encoder:
    """A reusable pickler: making one costs more than pickling a small message.

    Used by one caller at a time; a second (another thread, a reentrant __reduce__)
    gets a fresh pickler instead of waiting.
    """

    def __init__(self) -> None:
        self._parts = _Parts()
        self._pickler = _Pickler(self._parts, PROTOCOL)
        self._lock = _thread.allocate_lock()

    def dump(self, obj: Any) -> List[Any]:
        if not self._lock.acquire(False):
            parts = _Parts()
            _Pickler(parts, PROTOCOL).dump(obj)
            return parts
        try:
            self._pickler.clear_memo()
            self._pickler.dump(obj)
            return self._parts[:]
        except BaseException:
            # Its state after a failed dump is not worth trusting.
            self._pickler = _Pickler(self._parts, PROTOCOL)
            raise
        finally:
            self._parts.clear()
            self._lock.release()


_ENCODER = _Encoder()


def dumps_parts(obj: Any) -> Tuple[List[Any], bool]:
    """Like :func:`dumps`, but returns the data as a list of bytes-like parts."""
    try:
        return _ENCODER.dump(obj), False
    except Exception:  # noqa: BLE001 - dumps() decides, and says why
        pass
    data, used_dill = dumps(obj)
    return [data], used_dill


def loads(data: Any, used_dill: bool) -> Any:
    """Inverse of :func:`dumps`; data may be bytes, bytearray, memoryview, or a file
    object such as a streamed frame body (then it is read as it arrives)."""
    if type(data) is not memoryview and hasattr(data, "readinto"):
        return (_DillUnpickler(data) if used_dill else pickle.Unpickler(data)).load()
    if used_dill:
        return _DillUnpickler(io.BytesIO(data)).load()
    return pickle.loads(data)


def _create_type(typeobj: type, name: str, bases: Any, namespace: Any) -> type:
    # dill sends classes of __main__ by value and rebuilds a new class on load.  Where
    # this process's __main__ has that class (the parent, receiving results), use it, so
    # `isinstance(result, Point)` holds at any depth, not only for the top-level object.
    existing = getattr(sys.modules.get("__main__"), name, None)
    if isinstance(existing, type) and existing.__module__ == "__main__" and existing.__name__ == name:
        return existing
    return typeobj(name, bases, namespace)


class _DillUnpickler(dill.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "dill._dill" and name == "_create_type":
            return _create_type
        return super().find_class(module, name)


def _describe(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001 - repr of user objects may fail
        text = f"<{type(obj).__qualname__} object>"
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(obj).__qualname__} {text}"


# -- callables ----------------------------------------------------------------------------

def check_task_name(name: str) -> None:
    """Validates the shape of a task name in the parent (resolution happens in the worker)."""
    module, attr = _split_task_name(name)
    if not module or not attr:
        raise ValueError(f"task name {name!r} must look like 'package.module:Name' "
                         "or 'package.module.Name'")


def _split_task_name(name: str) -> Tuple[str, str]:
    if ":" in name:
        module, _, attr = name.partition(":")
    else:
        module, _, attr = name.rpartition(".")
    return module.strip(), attr.strip()


def encode_callable(fn: Any) -> bytes:
    """Encodes a task: a callable, or a string naming a function or task class.

    Raises:
        SerializationError: the callable cannot be serialized.
    """
    if isinstance(fn, str):
        check_task_name(fn)
        return _TAG_NAME + fn.encode("utf-8")
    try:
        data, used_dill = dumps(fn)
    except SerializationError as exc:
        raise SerializationError(f"the function could not be serialized: {exc}",
                                 stage="function") from exc.__cause__
    return (_TAG_DILL if used_dill else _TAG_PICKLE) + data


def decode_callable(blob: bytes) -> Callable[..., Any]:
    """Inverse of :func:`encode_callable`, run in the worker."""
    tag, data = blob[:1], blob[1:]
    if tag == _TAG_NAME:
        return resolve_task_name(data.decode("utf-8"))
    return loads(data, tag == _TAG_DILL)


def resolve_task_name(name: str) -> Callable[..., Any]:
    """Finds the function or task class a name refers to.

    A class is run as ``Name(*args, **kwargs).run()``; a function is called directly.

    Raises:
        ImportError: the module cannot be imported (the message names it).
        AttributeError: the module has no such attribute (the message names it).
        TypeError: the class has no ``run`` method, or the object is not callable.
    """
    module_name, attr = _split_task_name(name)
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"task {name!r}: module {module_name!r} has no attribute "
                                 f"{attr!r}") from None
    if isinstance(obj, type):
        if not callable(getattr(obj, "run", None)):
            raise TypeError(f"task class {name!r} has no run() method")
        cls = obj

        def run_task_class(*args: Any, **kwargs: Any) -> Any:
            return cls(*args, **kwargs).run()
        return run_task_class
    if not callable(obj):
        raise TypeError(f"task {name!r} is not callable")
    return obj


# -- exceptions ---------------------------------------------------------------------------

def encode_exception(exc: BaseException) -> Tuple[Any, str, str, str]:
    """Returns (blob or None, type name, message, traceback text) for an exception."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    cls = type(exc)
    type_name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001
        message = "<str() failed>"
    blob = None
    try:
        # The traceback does not travel; the text above does.
        data, used_dill = dumps(exc)
        blob = (_TAG_DILL if used_dill else _TAG_PICKLE) + data
    except BaseException:  # noqa: BLE001 - the parent then raises RemoteError (runs in workers,
        # where even a SystemExit from a __reduce__ must not end the process)
        blob = None
    return blob, type_name, message, tb


def decode_exception(blob: Any) -> BaseException:
    """Rebuilds an exception from :func:`encode_exception`'s blob (may raise anything)."""
    exc = loads(blob[1:], blob[:1] == _TAG_DILL)
    if not isinstance(exc, BaseException):
        raise TypeError(f"expected an exception, got {type(exc).__qualname__}")
    return exc
