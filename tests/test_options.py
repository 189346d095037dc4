"""Method options: parsed from the command line and checked against the config's field types before any work."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from iwp.plugins.visual_token_select import METHODS, make_method
from iwp.tools.options import parse_options


@pytest.mark.parametrize("method, item, what", [
    ("iwp", "layer=1.5", "must be an integer"),
    ("iwp", "layer=true", "must be an integer"),
    ("iwp", "chunk=1.5", "must be an integer"),
    ("iwp", "lam=abc", "must be a finite number"),
    ("iwp", "lam=NaN", "must be a finite number"),
    ("iwp", "growth=Infinity", "must be a finite number"),
    ("iwp", "lam=1" + "0" * 400, "must be a finite number"),
    ("iwp", "layer=4294967296", "int32 range"),
    ("iwp", "queries=3", "must be a string"),
    ("iwp", "lam=2", "lam must be in [0, 1]"),
    ("btp", "rebalance=1", "must be true or false"),
    ("btp", "layers=[1,2.5]", "must be a list of integers"),
    ("btp", "layers=3", "must be a list of integers"),
    ("random", "seed=[1]", "must be an integer"),
    ("fastv", "nope=1", "has no option"),
])
def test_wrong_kinds_are_one_clear_error(method, item, what):
    with pytest.raises(ValueError, match=__import__("re").escape(what)):
        make_method(method, **parse_options([item]))


def test_right_kinds_are_kept_and_ints_widen_to_floats():
    m = make_method("iwp", **parse_options(["lam=1", "layer=3", "queries=last"]))
    assert m.config.lam == 1.0 and isinstance(m.config.lam, float)
    assert (m.config.layer, m.config.queries) == (3, "last")
    assert make_method("btp", **parse_options(["layers=[1,3,5]", "rebalance=false"])).config.layers == (1, 3, 5)
    assert make_method("btp", layers=None).config.layers is None


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(sorted(METHODS)),
       key=st.sampled_from(sorted({f for m in METHODS.values() for f in m.Config.__dataclass_fields__}) + ["bogus"]),
       raw=st.one_of(st.text(max_size=12), st.integers().map(str), st.floats(allow_nan=True).map(repr),
                     st.lists(st.integers(-5, 50), max_size=4).map(lambda v: str(v).replace(" ", "")),
                     st.sampled_from(["true", "false", "null", "[]", "{}", "\"last\"", "1e400", "-0"])))
def test_any_option_string_is_accepted_or_one_value_error(method, key, raw):
    try:
        m = make_method(method, **parse_options([f"{key}={raw}"]))
    except ValueError as err:
        assert "\n" not in str(err)
        return
    for name, value in vars(m.config).items():   # what is accepted is of the field's kind and finite
        if isinstance(value, float):
            assert math.isfinite(value)
