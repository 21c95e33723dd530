"""One generic registry: a config key picks one of the entries registered under a name.

The advantage estimators (`algorithm=<name>`), the environments (`env.name=<name>`) and the generation backends
(`rollout.backend=<name>`) are each one `Registry`:

    ESTIMATORS = Registry("advantage estimator", "algorithm", UnknownEstimatorError, "stepopsd/estimators/",
                          discover=package_modules("stepopsd.estimators"))

    @ESTIMATORS.register("rloo")
    class RLOO(Estimator): ...

`discover` runs once, before the first `names()` or `get()`: it imports the modules whose import registers their
entries (`package_modules`: every module of a package, or one named module of each of its subpackages; `modules`:
the modules named). A name cannot be taken twice by different objects (the same object again, from a re-imported
module, is fine); an unknown name is the registry's error, one line listing the registered names. This module sits
at the bottom of the house: it imports nothing of stepopsd but its errors.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import Any, Callable, Generic, TypeVar

from stepopsd.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name.

    kind: what an entry is, in messages ("advantage estimator"); key: the config key that picks one ("algorithm");
    error: the `UserError` subclass an unknown name raises; where: where the entries live, named at the end of that
    error ("stepopsd/estimators/"); listing: the words before the registered names in it; discover: imports what
    registers the entries (run once); origin: the object an entry was registered from (the entry itself unless
    `register` makes entries of something else); store: the dict the entries live in, when its owner keeps it
    (a module attribute a test may swap), else the registry's own.
    """

    def __init__(self, kind: str, key: str, error: type[UserError], where: str, *, listing: str = "registered:",
                 discover: Callable[[], None] | None = None, origin: Callable[[T], Any] = lambda entry: entry,
                 store: Callable[[], dict[str, T]] | None = None):
        self.kind, self.key, self.error, self.where, self.listing = kind, key, error, where, listing
        self.origin = origin
        self._discover = discover
        self._discovered = discover is None
        own: dict[str, T] = {}
        self._store = store if store is not None else (lambda: own)

    @property
    def entries(self) -> dict[str, T]:
        """The registered entries by name, as they are now (no discovery)."""
        return self._store()

    def register(self, name: str, make: Callable[[Any, T | None], T] | None = None) -> Callable[[Any], Any]:
        """Decorator: register the decorated object under `name` and return it unchanged. `make(obj, old)` makes
        the entry stored (default: the object itself; `old` is the entry the name held, or None). ValueError when
        the name is taken by another object."""
        def add(obj):
            entries = self.entries
            old = entries.get(name)
            if old is not None and self.origin(old) is not obj:
                article = "an" if self.kind[:1].lower() in "aeiou" else "a"
                raise ValueError(f"{article} {self.kind} named {name!r} is already registered "
                                 f"({self.origin(old).__module__})")
            entries[name] = make(obj, old) if make is not None else obj
            return obj
        return add

    def discover(self) -> None:
        """Run the discovery hook, once (again after it failed)."""
        if not self._discovered:
            self._discover()
            self._discovered = True

    def names(self) -> list[str]:
        """The registered names, sorted (after discovery)."""
        self.discover()
        return sorted(self.entries)

    def get(self, name) -> T:
        """The entry registered as `name` (after discovery); the registry's error, one line, for any other."""
        names = self.names()
        if name not in names:
            raise self.error(f"{self.key}={name}: no {self.kind} of that name; {self.listing} {', '.join(names)} "
                             f"({self.where})")
        return self.entries[name]


def package_modules(package: str, inner: str | None = None) -> Callable[[], None]:
    """A discovery hook: import every module of `package`; with `inner`, the module `inner` of each subpackage of
    `package` that has one (`stepopsd.envs.<name>.spec`)."""
    def discover() -> None:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if inner is None:
                importlib.import_module(f"{package}.{info.name}")
            elif info.ispkg and importlib.util.find_spec(f"{package}.{info.name}.{inner}") is not None:
                importlib.import_module(f"{package}.{info.name}.{inner}")
    return discover


def modules(*names: str) -> Callable[[], None]:
    """A discovery hook: import the modules `names`."""
    def discover() -> None:
        for name in names:
            importlib.import_module(name)
    return discover
