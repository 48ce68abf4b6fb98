"""The one registration mechanism (``lightning_backdoor.registry.Registry``) and the registries built on it."""

from __future__ import annotations

import sys
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

import lightning_backdoor.data  # noqa: F401  (importing the packages fills their registries)
import lightning_backdoor.defenses  # noqa: F401
import lightning_backdoor.models  # noqa: F401
from lightning_backdoor.registry import Registry
from lightning_backdoor.triggers import TRIGGERS, Trigger, build_trigger


def package_registries() -> dict[str, Registry]:
    """Every module-level Registry of the imported ``lightning_backdoor`` modules, by kind (found, not listed)."""
    found: dict[str, Registry] = {}
    for module_name, module in list(sys.modules.items()):
        if module_name.split(".")[0] == "lightning_backdoor" and module is not None:
            found |= {value.kind: value for value in vars(module).values() if isinstance(value, Registry)}
    return found


def test_every_registry_of_the_package_has_entries() -> None:
    registries = package_registries()
    assert {"trigger", "model", "defense", "trigger estimator", "data source"} <= set(registries)
    for kind, registry in registries.items():
        assert len(registry) > 0, f"the {kind} registry is empty"
        assert all(isinstance(name, str) and name for name in registry)


def test_the_decorator_registers_and_returns_the_entry() -> None:
    things: Registry = Registry("thing")

    @things.register("double")
    def double(value: int) -> int:
        return 2 * value

    assert double(3) == 6  # the decorated function is unchanged
    assert things["double"] is things.lookup("double") is double
    assert things.build("double", value=4) == 8
    assert "double" in things and list(things) == ["double"] and len(things) == 1
    assert isinstance(things, Mapping) and not hasattr(things, "__setitem__")


def test_a_registered_class_gets_its_name() -> None:
    things: Registry = Registry("thing")

    class Base:
        name = ""

    @things.register("special")
    class Special(Base):
        pass

    assert Special.name == "special" and Base.name == ""
    assert things.build("special").name == "special"


def test_a_second_entry_under_a_name_is_refused() -> None:
    things: Registry = Registry("thing")
    first = things.register("one")(lambda: 1)
    things.register("one")(first)  # the same entry again (a module imported twice) is harmless
    with pytest.raises(ValueError, match="thing 'one' is already registered"):
        things.register("one")(lambda: 2)
    assert things["one"] is first
    with pytest.raises(ValueError, match="non-empty name"):
        things.register("")


def test_an_unknown_name_is_one_line_with_close_matches_and_the_known_names() -> None:
    with pytest.raises(ValueError) as error:
        build_trigger("blendd")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("unknown trigger 'blendd' (did you mean 'blended'?); known triggers: ")
    assert all(name in message for name in TRIGGERS)
    with pytest.raises(ValueError, match=r"^unknown trigger 'zzz'; known triggers: adaptive_blend, additive, "):
        build_trigger("zzz")  # nothing close: no suggestion


def test_a_trigger_defined_here_registers_by_decorator_and_builds_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TRIGGERS, "_entries", dict(TRIGGERS))  # the registration is undone after the test

    @TRIGGERS.register("invert")
    class Invert(Trigger):
        """Every pixel inverted."""

        def apply(self, images: Tensor) -> Tensor:
            return 1 - images

    trigger = build_trigger("invert", seed=3)
    assert isinstance(trigger, Invert) and trigger.name == "invert" and trigger.seed == 3
    assert torch.equal(trigger(torch.zeros(1, 1, 2, 2)), torch.ones(1, 1, 2, 2))
    assert "invert" in TRIGGERS
