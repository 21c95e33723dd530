"""The generic registry (stepopsd/registry.py) the estimators, environments and generation backends are made of:
register by name, a name taken once, discovery run once before the first lookup, an unknown name one line listing
the registered ones."""
import sys
import types

import pytest

from stepopsd.errors import UserError
from stepopsd.registry import Registry, modules, package_modules


class UnknownWidgetError(UserError, ValueError):
    pass


def widgets(**kwargs) -> Registry:
    return Registry("widget", "shop.widget", UnknownWidgetError, "shop/widgets/", **kwargs)


def test_a_registered_object_is_found_by_name():
    reg = widgets()

    @reg.register("gear")
    class Gear:
        pass

    assert reg.names() == ["gear"] and reg.get("gear") is Gear and reg.entries == {"gear": Gear}


def test_make_builds_the_entry_and_origin_names_what_it_came_from():
    reg = widgets(origin=type)
    seen = []

    def instance(cls, old):
        seen.append(old)
        return cls()

    class Gear:
        pass

    assert reg.register("gear", instance)(Gear) is Gear  # the decorator hands the class back
    first = reg.get("gear")
    assert isinstance(first, Gear) and seen == [None]
    reg.register("gear", instance)(Gear)  # the same class again (a re-imported module) is fine
    assert seen == [None, first] and reg.get("gear") is not first


def test_a_name_cannot_be_taken_by_another_object():
    reg = widgets()
    gear = reg.register("gear")(type("Gear", (), {"__module__": "shop.gears"}))
    with pytest.raises(ValueError, match=r"^a widget named 'gear' is already registered \(shop.gears\)$"):
        reg.register("gear")(type("Other", (), {}))
    assert reg.get("gear") is gear
    engines = Registry("engine", "car.engine", UnknownWidgetError, "car/")
    engines.register("v8")(gear)
    with pytest.raises(ValueError, match="^an engine named 'v8'"):  # the article follows the kind
        engines.register("v8")(int)


def test_discovery_runs_once_before_the_first_lookup():
    calls = []
    reg = widgets(discover=lambda: calls.append(1) or reg.register("found")(object))
    reg.register("gear")(int)
    assert calls == []  # registering does not discover
    assert reg.names() == ["found", "gear"] and calls == [1]
    assert reg.get("found") is object and reg.names() == ["found", "gear"]
    with pytest.raises(UnknownWidgetError):
        reg.get("sprocket")
    assert calls == [1]


def test_a_failed_discovery_is_tried_again():
    calls = []

    def discover():
        calls.append(1)
        if len(calls) == 1:
            raise ImportError("half a module")

    reg = widgets(discover=discover)
    with pytest.raises(ImportError):
        reg.names()
    assert reg.names() == [] and reg.names() == [] and calls == [1, 1]


def test_an_unknown_name_is_one_line_listing_the_registered_ones():
    reg = widgets()
    reg.register("gear")(int)
    reg.register("cog")(str)
    with pytest.raises(UnknownWidgetError) as e:
        reg.get("sprocket")
    assert str(e.value) == "shop.widget=sprocket: no widget of that name; registered: cog, gear (shop/widgets/)"
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    other = widgets(listing="choose one of")
    other.register("gear")(int)
    with pytest.raises(UnknownWidgetError, match=r"^shop.widget=None: no widget of that name; choose one of gear "):
        other.get(None)


def test_a_store_the_owner_keeps_can_be_swapped():
    """The backend registry keeps its entries in a module attribute, so that a test can register into a copy."""
    home = types.SimpleNamespace(table={})
    reg = widgets(store=lambda: home.table)
    reg.register("gear")(int)
    saved, home.table = home.table, dict(home.table)
    reg.register("toy")(str)
    assert reg.names() == ["gear", "toy"]
    home.table = saved
    assert reg.names() == ["gear"] and saved == {"gear": int}


def test_the_discovery_hooks_import_modules(tmp_path, monkeypatch):
    pkg = tmp_path / "regtoy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "bare").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "spec.py").write_text("")
    (pkg / "bare" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "regtoy"]:
        monkeypatch.delitem(sys.modules, name)
    package_modules("regtoy", "spec")()
    assert "regtoy.sub.spec" in sys.modules and "regtoy.top" not in sys.modules  # bare/ has no spec: skipped
    package_modules("regtoy")()
    assert {"regtoy.top", "regtoy.sub", "regtoy.bare"} <= set(sys.modules)
    monkeypatch.delitem(sys.modules, "regtoy.top")
    modules("regtoy.top")()
    assert "regtoy.top" in sys.modules
    for name in [m for m in sys.modules if m.split(".")[0] == "regtoy"]:
        monkeypatch.delitem(sys.modules, name)
