"""Standard-library-only bootstrap: run the Ultralytics registration when ``ultralytics.nn.tasks`` is imported.

Nothing here imports torch or Ultralytics. :func:`ensure_registered` either registers at once (Ultralytics' model
module is already loaded) or puts a one-shot finder at the front of ``sys.meta_path`` that wraps that module's loader,
so the registration runs right after the module body and before anything imports names from it by value.
Calling :func:`so_det_ultra.integration.install` from here is the one import that goes up the layers, by design (the
import contracts in pyproject.toml name it; docs/architecture.md, "Layers").
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings

TARGET = "ultralytics.nn.tasks"
_lock = threading.Lock()


def _register(strict=False):
    """Run the integration; with ``strict=False`` (automatic path) a failure is a loud warning, not an ImportError."""
    try:
        from so_det_ultra.integration import install

        install(strict=strict)
    except Exception as err:  # never break `import ultralytics` for users who are not using the plugin
        if strict:
            raise
        warnings.warn(f"so-det-ultra could not register with Ultralytics: {err!r}", RuntimeWarning, stacklevel=2)


class _LoaderProxy:
    """Delegate to the real loader; after the module body has run, register the plugin."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = self._loader  # leave no trace of the proxy on the module
        _register()


class _TasksFinder(importlib.abc.MetaPathFinder):
    """One-shot finder for ``ultralytics.nn.tasks``; removes itself on first use."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        _remove_finder()
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderProxy(spec.loader)
                return spec
        return None


def _remove_finder():
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TasksFinder)]


def _loaded(name):
    """True when ``name`` is imported and its body has finished running."""
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def ensure_registered():
    """Register now if Ultralytics' model module is loaded, else arm the one-shot import hook (idempotent)."""
    if _loaded(TARGET):
        _register()
        return
    with _lock:
        if not any(isinstance(f, _TasksFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _TasksFinder())
