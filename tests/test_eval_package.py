"""saeengine.eval's lazy entry points: every listed name resolves to the object its module defines."""

import importlib

import pytest

import saeengine.eval as ev


@pytest.mark.parametrize("name", ev.__all__)
def test_entry_point_resolves_to_its_module(name):
    module = importlib.import_module(f"saeengine.eval.{ev._WHERE[name]}")
    assert getattr(ev, name) is getattr(module, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ev.nope  # noqa: B018
