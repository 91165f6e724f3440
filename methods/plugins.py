"""User code named as plugins: a module name, a `.py` file or a package folder whose import registers methods,
networks or datasets, plus the installed packages that declare the `kdo.plugins` entry point group.

Importing one is idempotent, by module name: a file named twice (a config's `plugins:` and `--plugin`), or a
config unpickled again in a reused Ray actor, runs its module once. A file's module is named after it (`dist.py`
is `dist`), so Ray can ship it to other nodes (`py_modules`) and a worker imports the shipped copy by that name:
a worker prefers the copy in Ray's runtime resources to the driver's path (the path may not exist there).
Every failure is one `PluginError` line naming the plugin and the error's last line.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

ENTRY_POINT_GROUP = "kdo.plugins"
# kdo's own top-level packages: a plugin (or a user's module) by one of these names would shadow kdo itself.
KDO_PACKAGES = ("methods", "orchestrator", "search_spaces")
_SHIPPED = "runtime_resources"  # Ray unpacks a job's py_modules under <session>/runtime_resources/...
_loaded: dict[str, str] = {}  # module name -> the plugin spec that loaded it in this process
_entry_points_loaded = False


class PluginError(ValueError):
    """A plugin that cannot be found or imported, or clashes with another module: one line."""


def is_path(spec: str) -> bool:
    """A plugin given as a file or folder (it has a `/` or ends in `.py`), not as an importable module name."""
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def module_name(spec: str) -> str:
    """The module a plugin is imported as: a file's stem, a folder's name, or the module name itself."""
    return Path(spec.rstrip("/\\")).name.removesuffix(".py") if is_path(spec) else spec


def resolve(spec: str, *bases: Path) -> str:
    """A path plugin made absolute: tried against each of `bases` (e.g. the folder of the file that names it), then
    the working directory; a module name as it is. A path found nowhere stays as given (its import says so)."""
    if not is_path(spec):
        return spec
    path = Path(spec).expanduser()
    if path.is_absolute():
        return str(path)
    for base in (*bases, Path.cwd()):
        if (base / path).exists():
            return str((base / path).resolve())
    return spec


def _shipped_copy(name: str) -> importlib.machinery.ModuleSpec | None:
    """The copy of module `name` Ray shipped to this process (a job's `py_modules`), if any."""
    paths = [p for p in sys.path if _SHIPPED in p]
    return importlib.machinery.PathFinder.find_spec(name, paths) if paths else None


def _file_spec(spec: str, name: str) -> importlib.machinery.ModuleSpec:
    path = Path(spec)
    if path.is_dir():
        init = path / "__init__.py"
        if not init.is_file():
            raise PluginError(f"plugin {spec}: a folder plugin must be a package (it has no __init__.py)")
        found = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(path)])
    elif path.is_file():
        found = importlib.util.spec_from_file_location(name, path)
    else:
        raise PluginError(f"plugin {spec}: no such file or folder (relative paths are tried beside the file that "
                          f"names them, then in {Path.cwd()})")
    assert found is not None
    return found


def _same_origin(module: ModuleType, spec: str) -> bool:
    origin = getattr(module, "__file__", None)
    if origin is None:
        return False
    origin_path = Path(origin).resolve()
    target = Path(spec).resolve()
    return origin_path in (target, target / "__init__.py") or _SHIPPED in str(origin_path)


def load_plugin(spec: str) -> ModuleType:
    """Import one plugin (idempotent by module name); `PluginError` on any failure."""
    name = module_name(spec)
    if not name.replace(".", "_").isidentifier():
        raise PluginError(f"plugin {spec}: '{name}' is not a valid Python module name; rename the file")
    if name.split(".")[0] in KDO_PACKAGES:
        raise PluginError(f"plugin {spec}: its module name '{name}' is one of kdo's own packages (methods, "
                          "orchestrator, search_spaces); rename it")
    present = sys.modules.get(name)
    if present is not None:
        if not is_path(spec) or _loaded.get(name) == spec or _same_origin(present, spec):
            _loaded.setdefault(name, spec)
            return present
        raise PluginError(f"plugin {spec}: module name '{name}' is taken by {getattr(present, '__file__', name)} "
                          f"(from {_loaded.get(name, 'elsewhere')}); rename one of them")
    try:
        if is_path(spec):
            found = _shipped_copy(name) or _file_spec(spec, name)
            module = importlib.util.module_from_spec(found)
            sys.modules[name] = module
            try:
                assert found.loader is not None
                found.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            module = importlib.import_module(name)
    except PluginError:
        raise
    except Exception as err:  # a plugin's own code may raise anything while it is imported
        raise PluginError(f"plugin {spec}: {_last_line(err)}") from None
    _loaded[name] = spec
    return module


def _last_line(err: BaseException) -> str:
    if isinstance(err, SyntaxError):
        return f"SyntaxError: {err.msg} ({Path(err.filename or '?').name}, line {err.lineno})"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1]}" if text else type(err).__name__


def load_plugins(specs: Iterable[str]) -> None:
    """Import every plugin named (and the installed entry points once per process)."""
    load_entry_points()
    for spec in specs:
        load_plugin(spec)


def load_entry_points() -> None:
    """Import every installed package's `kdo.plugins` entry point, once per process: called whenever a registry is
    asked, so an installed plugin needs no naming at all."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            point.load()
        except Exception as err:  # an installed plugin's import may raise anything
            _entry_points_loaded = False  # asked again, it fails again: never half-registered in silence
            raise PluginError(f"plugin entry point '{point.name}' ({point.value}, group {ENTRY_POINT_GROUP}): "
                              f"{_last_line(err)}") from None


def merged(*lists: Iterable[str]) -> list[str]:
    """Plugin lists joined in order, each spec once."""
    return list(dict.fromkeys(spec for specs in lists for spec in specs))


def replaced(recorded: Iterable[str], given: Iterable[str]) -> list[str]:
    """A recorded plugin list (a sweep's or study's) with the plugins given now taking the place of any recorded one
    of the same module name (a file that moved), then the others given."""
    given = list(given)
    names = {module_name(g) for g in given}
    return merged([r for r in recorded if module_name(r) not in names], given)
