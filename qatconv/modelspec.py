"""``--model SPEC`` -> ``nn.Module``: ``path/to/file.py:NAME`` or ``package.module:NAME``.

NAME is a class or a callable returning an ``nn.Module`` (dotted names reach attributes, e.g.
``models:Zoo.small``); ``--model-arg KEY=VALUE`` values become its keyword arguments. Every
way this can fail is a `ModelSpecError` (exit 3) that names the spec; the user's own exception
is chained so ``--debug`` shows its traceback.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from qatconv.errors import ModelSpecError, UsageError, describe

log = logging.getLogger(__name__)

_SPEC_HINT = "write --model path/to/file.py:NAME or --model package.module:NAME"
_DEBUG_HINT = "fix the model code (rerun with --debug for the traceback)"


def parse_model_args(items: Sequence[str]) -> dict[str, object]:
    """Parse repeated ``--model-arg KEY=VALUE`` items.

    VALUE is parsed as JSON (``64``, ``0.1``, ``true``, ``[1, 2]``, ``null``), else kept as a
    string (``relu``).

    Raises:
        UsageError: an item without ``=``, a KEY that is not a Python identifier, or a KEY
            given twice.
    """
    args: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(
                f"--model-arg {item!r} is not KEY=VALUE",
                hint="e.g. --model-arg hidden=64 --model-arg act=relu",
            )
        if not key.isidentifier():
            raise UsageError(
                f"--model-arg {item!r}: {key!r} is not a valid keyword argument name",
                hint="KEY must be a Python identifier, as in the model's constructor",
            )
        if key in args:
            raise UsageError(f"--model-arg {key!r} is given twice", hint="give each KEY once")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return args


def build_model(
    spec: str, args: dict[str, object] | None = None, *, device: str | None = None
) -> nn.Module:
    """Import ``spec``'s NAME, call it with ``args`` and return the model in eval mode.

    Args:
        spec: ``path/to/file.py:NAME`` (imported from the file; its folder is importable so
            sibling modules resolve) or ``package.module:NAME``.
        args: keyword arguments for NAME (see `parse_model_args`).
        device: build the model's tensors there (``"meta"``: shapes only, no memory). The
            module is imported outside it, so what its import creates stays real.

    Raises:
        ModelSpecError: no ``:NAME``; the file is missing; importing raises; NAME is missing,
            not callable, or an ``nn.Module`` instance; the arguments do not fit; the call
            raises or returns something that is not an ``nn.Module``.
    """
    args = dict(args or {})
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ModelSpecError(f"model spec {spec!r} has no ':NAME' part", hint=_SPEC_HINT)
    if not all(part.isidentifier() for part in name.split(".")):
        raise ModelSpecError(f"model spec {spec!r}: {name!r} is not a Python name", hint=_SPEC_HINT)
    if _looks_like_file(target):
        module = _import_file(spec, Path(target))
    else:
        module = _import_module(spec, target)
    factory = _resolve(spec, module, name)
    if device is None:
        return _call(spec, factory, args)
    import torch

    with torch.device(device):
        return _call(spec, factory, args)


# Packages whose plain functions read files or run code (torch.load, torch.hub.load, numpy.load,
# pandas.read_pickle): a recorded spec may name their nn.Module classes, never their functions.
_LOADER_PACKAGES = frozenset({
    "torch", "numpy", "pandas", "scipy", "joblib", "dill", "cloudpickle", "yaml", "safetensors",
    "qatconv", "setuptools", "pip", "pkg_resources", "IPython", "pytest", "_pytest",
})


def check_recorded_spec(spec: str, source: object) -> None:
    """Vet a model spec that a checkpoint's metadata names, before anything calls it.

    A spec typed by the user may name any factory: the user asked for it to run. A spec read
    from a file someone else wrote must name model code: an ``nn.Module`` class, or a function
    defined in the named model file, or in an installed (non-standard-library) package module
    when it is annotated to return an ``nn.Module`` subclass; the function's result is checked
    to be an ``nn.Module`` when it is called. Refused: builtins
    and standard-library callables (``subprocess:run``), files inside the Python installation,
    other callable objects, functions of packages that load files (``torch.hub:load``), and
    functions annotated to return something other than an ``nn.Module``.

    Raises:
        ModelSpecError: the spec does not meet that; the hint says to pass ``--model``.
    """
    hint = "pass the model explicitly: --model path/to/file.py:NAME"
    if not isinstance(spec, str):
        raise ModelSpecError(f"{source}: the recorded model spec is not a string", hint=hint)
    target, sep, name = spec.rpartition(":")
    is_file = bool(sep and target) and _looks_like_file(target)
    if sep and target and (_in_stdlib(target) if not is_file else _in_python_install(target)):
        raise ModelSpecError(
            f"{source} names {spec!r} as its model; that is not model code, refusing to run it",
            hint=hint,
        )
    if not sep or not target or not name or not all(p.isidentifier() for p in name.split(".")):
        raise ModelSpecError(f"{source}: the recorded model spec {spec!r} is malformed", hint=hint)
    module = _import_file(spec, Path(target)) if is_file else _import_module(spec, target)
    why = _not_model_code(_resolve(spec, module, name), module, is_file)
    if why:
        raise ModelSpecError(
            f"{source} names {spec!r} as its model, which {why}; refusing to call it", hint=hint
        )


def _in_stdlib(target: str) -> bool:
    top = target.split(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def _in_python_install(target: str) -> bool:
    """True for a file of the standard library, or of a package whose functions load files."""
    import sysconfig

    file = Path(target).resolve()
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib"):
        if paths.get(key) and file.is_relative_to(Path(paths[key]).resolve()) and not any(
            file.is_relative_to(Path(paths[k]).resolve()) for k in ("purelib", "platlib")
            if paths.get(k)
        ):
            return True
    for key in ("purelib", "platlib"):
        root = Path(paths[key]).resolve() if paths.get(key) else None
        if root is not None and file.is_relative_to(root):
            parts = file.relative_to(root).parts
            if parts[:2] == ("qatconv", "_samples"):  # the bundled sample models
                return False
            top = parts[0].removesuffix(".py")
            return top in _LOADER_PACKAGES or _in_stdlib(top)
    return False


def _not_model_code(obj: object, module: types.ModuleType, is_file: bool) -> str | None:
    """Why ``obj`` is not a model class or factory a checkpoint may name (None: it is)."""
    if isinstance(obj, type):
        return None if issubclass(obj, nn.Module) else "is a class but not an nn.Module"
    func = getattr(obj, "__func__", obj)  # a classmethod/staticmethod reached through a class
    if not inspect.isfunction(func):
        return f"is a {type(obj).__name__}, not a class or a function"
    home = getattr(func, "__module__", None) or ""
    top = home.split(".")[0]
    if is_file and home != module.__name__:
        return f"is {home}.{func.__qualname__}, not a function defined in that file"
    if _in_stdlib(home) or top in _LOADER_PACKAGES:
        return f"is {home}.{func.__qualname__}, not a model factory"
    returns = _return_type(func)
    if isinstance(returns, type) and not issubclass(returns, nn.Module):
        return f"is a function that returns {returns.__name__}, not an nn.Module"
    if not is_file and not (isinstance(returns, type) and issubclass(returns, nn.Module)):
        # Only the result is checked once called, and a package function can do anything
        # before it returns (sympy:sympify evaluates its argument). A package factory is
        # trusted only when it declares an nn.Module result, as timm's and torchvision's do.
        return (
            f"is {home}.{func.__qualname__}, a package function not annotated to return an "
            "nn.Module"
        )
    return None


def _return_type(func: Callable[..., object]) -> object:
    import typing

    try:
        return typing.get_type_hints(func).get("return")
    except Exception:  # noqa: BLE001 - an annotation that does not resolve tells nothing
        return None


def record_spec(spec: str | None) -> dict[str, str | None]:
    """How a checkpoint records the spec it was built from.

    A file spec is recorded relative to the working directory (so a checkpoint moved with its
    project still finds the code) and, as ``spec_resolved``, by its absolute path (so a
    checkpoint read from another folder of the same machine does). A module spec is kept as is.
    """
    if not spec or ":" not in spec:
        return {"spec": spec}
    target, _, name = spec.rpartition(":")
    if not _looks_like_file(target):
        return {"spec": spec}
    file = Path(target).resolve()
    try:
        relative = Path(os.path.relpath(file)).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        relative = file.as_posix()
    return {"spec": f"{relative}:{name}", "spec_resolved": f"{file.as_posix()}:{name}"}


def spec_from_record(model_meta: dict[str, object], source: object) -> tuple[str, str]:
    """The spec a checkpoint records, vetted; and which form of it was used, in words.

    The relative form is tried first (from the working directory), then the absolute path.

    Raises:
        ModelSpecError: no spec is recorded, neither form finds the file, or the spec is not
            model code (`check_recorded_spec`).
    """
    spec, resolved = model_meta.get("spec"), model_meta.get("spec_resolved")
    hint = "pass --model path/to/file.py:NAME"
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(f"{source} names no model spec", hint=hint)
    target = spec.rpartition(":")[0]
    if not _looks_like_file(target) or Path(target).is_file():
        used, how = spec, "relative to the working directory" if _looks_like_file(target) else ""
    elif isinstance(resolved, str) and Path(resolved.rpartition(":")[0]).is_file():
        used, how = resolved, "by its absolute path"
    else:
        tried = spec + (f" or {resolved}" if isinstance(resolved, str) else "")
        raise ModelSpecError(
            f"{source} names the model file {tried}, which does not exist here", hint=hint
        )
    check_recorded_spec(used, source)
    return used, f"model spec {used} from {source}" + (f" ({how})" if how else "")


def _looks_like_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target or Path(target).is_file()


def _import_file(spec: str, file: Path) -> types.ModuleType:
    if not file.is_file():
        raise ModelSpecError(
            f"model spec {spec!r}: file {file} does not exist",
            hint="check the path (relative paths start at the current folder)",
        )
    file = file.resolve()
    folder = str(file.parent)
    # The file's folder goes on sys.path (as `python file.py` does) so `import sibling` works;
    # the file itself is loaded as a submodule of a synthetic package over that folder so that
    # `from .sibling import x` works too. The package name is unique per folder.
    package = "_qatconv_models_" + hashlib.sha256(folder.encode()).hexdigest()[:12]
    mod_name = f"{package}.{file.stem}" if file.stem.isidentifier() else None
    if mod_name is None:
        mod_name = f"{package}._{hashlib.sha256(file.name.encode()).hexdigest()[:8]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    if folder not in sys.path:
        sys.path.insert(0, folder)
    if package not in sys.modules:
        pkg = types.ModuleType(package)
        pkg.__path__ = [folder]
        sys.modules[package] = pkg
    loader_spec = importlib.util.spec_from_file_location(mod_name, file)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelSpecError(f"model spec {spec!r}: cannot import {file}", hint=_SPEC_HINT)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[mod_name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ModelSpecError(
            f"model spec {spec!r}: importing {file} raised {describe(e)}", hint=_import_hint(e)
        ) from e
    return module


def _import_module(spec: str, target: str) -> types.ModuleType:
    try:
        return _import_or_retry_from_cwd(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise ModelSpecError(
                f"model spec {spec!r}: no module named {e.name!r}",
                hint="install the package or add its folder to PYTHONPATH; for a file write "
                "path/to/file.py:NAME",
            ) from e
        raise ModelSpecError(
            f"model spec {spec!r}: importing {target} raised {describe(e)}", hint=_import_hint(e)
        ) from e
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise ModelSpecError(
            f"model spec {spec!r}: importing {target} raised {describe(e)}", hint=_DEBUG_HINT
        ) from e


def _import_or_retry_from_cwd(target: str) -> types.ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        # The `qatconv` console script does not put the current folder on sys.path the way
        # `python -m` does; users expect `--model mypkg.net:Net` to find ./mypkg.
        cwd = os.getcwd()
        top = target.split(".")[0]
        if e.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        log.debug("retrying import of %s with %s on sys.path", target, cwd)
        return importlib.import_module(target)


def _resolve(spec: str, module: types.ModuleType, name: str) -> Callable[..., object]:
    obj: object = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelSpecError(
                f"model spec {spec!r}: {_label(module)} has no attribute {name!r}",
                hint=_candidates_hint(module),
            ) from None
    if isinstance(obj, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r}: {name} is an nn.Module instance, not a class or factory",
            hint=f"point --model at its class ({type(obj).__name__}) or a function that builds it",
        )
    if not callable(obj):
        raise ModelSpecError(
            f"model spec {spec!r}: {name} is a {type(obj).__name__}, not a class or function",
            hint=_candidates_hint(module),
        )
    return obj


def _call(spec: str, factory: Callable[..., object], args: dict[str, object]) -> nn.Module:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(**args)
        except TypeError as e:
            raise ModelSpecError(
                f"model spec {spec!r}: arguments {sorted(args)} do not fit {signature}: {e}",
                hint="check the --model-arg names against the constructor's parameters",
            ) from None
    try:
        model = factory(**args)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise ModelSpecError(
            f"model spec {spec!r}: building the model raised {describe(e)}",
            hint="fix the model code or its --model-arg values (rerun with --debug for the "
            "traceback)",
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r} returned a {type(model).__name__}, not an nn.Module",
            hint="NAME must be an nn.Module class or a function that returns one",
        )
    return model.eval()


def _label(module: types.ModuleType) -> str:
    file = getattr(module, "__file__", None)
    return str(file) if file and module.__name__.startswith("_qatconv_models_") else module.__name__


def _candidates_hint(module: types.ModuleType) -> str:
    names = sorted(
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and isinstance(v, type)
        and issubclass(v, nn.Module)
        and getattr(v, "__module__", None) == module.__name__
    )
    if names:
        return f"nn.Module classes defined there: {', '.join(names[:8])}"
    return "NAME must be an nn.Module class or a function returning one, defined in that module"


def _import_hint(e: BaseException) -> str:
    if isinstance(e, ModuleNotFoundError) and e.name:
        return f"the model code imports {e.name!r}, which is not installed or not on PYTHONPATH"
    return _DEBUG_HINT
