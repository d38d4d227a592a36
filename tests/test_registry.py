import pytest

from comdefend.errors import UsageError
from comdefend.registry import Registry


def test_register_lookup_aliases_and_case():
    reg: Registry[int] = Registry("widget")

    @reg.register("Alpha", aliases=("a1",))
    def alpha() -> int:
        return 1

    assert reg.get(" alpha ") is alpha
    assert reg.get("A1") is alpha
    assert reg.canonical("a1") == "alpha"
    assert reg.names() == ["alpha"] and "A1" in reg and 3 not in reg
    assert reg.aliases_of("alpha") == ["a1"]


def test_unknown_name_lists_valid_names():
    reg: Registry[int] = Registry("widget")
    reg.add("one", 1)
    reg.add("two", 2)
    with pytest.raises(UsageError, match=r"unknown widget 'three'; valid: one, two"):
        reg.get("three")
    with pytest.raises(UsageError, match="must be a string"):
        reg.get(3)  # type: ignore[arg-type]


def test_duplicates_refused_unless_replace():
    reg: Registry[int] = Registry("widget")
    reg.add("one", 1, aliases=("uno",))
    with pytest.raises(UsageError, match="already registered"):
        reg.add("ONE", 2)
    with pytest.raises(UsageError, match="already registered"):
        reg.add("other", 2, aliases=("uno",))
    reg.add("one", 3, replace=True)
    assert reg.get("uno") == 3
    reg.remove("uno")
    assert "one" not in reg and "uno" not in reg and len(reg) == 0


def test_dict_style_access_keeps_working():
    reg: Registry[int] = Registry("widget")
    reg.add("one", 1, aliases=("uno",))
    reg.add("two", 2)
    assert reg["UNO"] == 1 and reg.values() == [1, 2] and list(reg) == ["one", "two"]
    with pytest.raises(UsageError, match="unknown widget 'three'"):
        reg["three"]
