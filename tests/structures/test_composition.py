import pytest

from xtalforge.errors import CompositionError
from xtalforge.structures.composition import Composition


@pytest.mark.parametrize(
    "text,units,expected",
    [
        ("Si16", 1, {"Si": 16}),
        ("Na8Cl8", 1, {"Na": 8, "Cl": 8}),
        ("Al2O3", 2, {"Al": 4, "O": 6}),
        ("Mg2SiO4", 1, {"Mg": 2, "Si": 1, "O": 4}),
        ("Mg2SiO4", 4, {"Mg": 8, "Si": 4, "O": 16}),
        (" Ga4 As4 ", 1, {"Ga": 4, "As": 4}),
    ],
)
def test_parse(text, units, expected):
    comp = Composition.parse(text, formula_units=units)
    assert comp.as_dict() == expected
    assert comp.n_atoms == sum(expected.values())
    assert len(comp.numbers) == comp.n_atoms


def test_reduced_formula_units():
    comp, z = Composition.parse("Al2O3", 2).reduced
    assert comp.formula == "Al2O3" and z == 2


@pytest.mark.parametrize(
    "text,units,fragment",
    [
        ("Xx4", 1, "unknown element 'Xx'"),
        ("si8", 1, "cannot parse"),
        ("Si0", 1, "must be positive"),
        ("Si-2", 1, "must be positive"),
        ("", 1, "empty composition"),
        ("   ", 1, "empty composition"),
        ("Si201", 1, "at most 200"),
        ("Al2O3", 41, "at most 200"),
        ("Si8", 0, "formula-unit count"),
        ("Si8$", 1, "cannot parse"),
    ],
)
def test_bad_compositions_give_one_line_errors(text, units, fragment):
    with pytest.raises(CompositionError) as err:
        Composition.parse(text, formula_units=units)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message
