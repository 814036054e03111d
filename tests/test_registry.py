import pytest

from robustseg.errors import UnknownNameError
from robustseg.registry import Registry


def test_register_get_and_names():
    reg = Registry("widget")

    @reg.register("b", params=int)
    def b():
        return 2

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a")() == 1 and reg.get("b")() == 2
    assert reg.names() == ["a", "b"] and len(reg) == 2 and "a" in reg
    assert reg.meta("b") == {"params": int}


def test_unknown_name_lists_valid():
    reg = Registry("widget")
    reg.register("alpha")(object())
    with pytest.raises(UnknownNameError, match=r"unknown widget 'beta'; valid: alpha"):
        reg.get("beta")
    with pytest.raises(KeyError):  # still a KeyError for generic callers
        reg.get("beta")


def test_duplicate_registration_fails():
    reg = Registry("widget")
    reg.register("x")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(2)
