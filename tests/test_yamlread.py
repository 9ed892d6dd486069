"""The event-stream YAML reader gives what yaml.safe_load gives, and refuses what the full loader
refuses (property test over random documents, and the hostile shapes one by one)."""

from __future__ import annotations

import datetime

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qsearch.errors import QsearchError
from qsearch.files import MAX_DEPTH, LinedDict, load_yaml
from qsearch.yamlread import Unusual, load

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=False, width=64), st.text(max_size=12),
                    st.sampled_from(["yes", "no", "on", "off", "~", "0x1f", "1e3", ".inf", "-.inf", "2026-12-04",
                                     "12:30", "0o17", "+1", "1_000", "null", "True", "<<x"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=25)


@settings(max_examples=150, deadline=None)
@given(doc=values, flow=st.sampled_from([None, True, False]))
def test_same_values_as_safe_load(doc, flow):
    text = yaml.safe_dump(doc, default_flow_style=flow, sort_keys=False)
    ref = yaml.safe_load(text)
    got = load(text, LinedDict, MAX_DEPTH)
    assert got == ref or (got != got and ref != ref)


def test_plain_scalars_are_typed_like_yaml_1_1_and_lines_are_kept():
    text = "a: yes\nb: 0x1f\nc: 2026-12-04\nd: '1'\ne: !!str 2\nf: [1.5, .nan, null]\n"
    got = load(text, LinedDict, MAX_DEPTH)
    assert got["a"] is True and got["b"] == 31 and got["c"] == datetime.date(2026, 12, 4)
    assert got["d"] == "1" and got["e"] == "2" and got["f"][0] == 1.5 and got["f"][2] is None
    assert got.lines == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6} and got.line == 1


@pytest.mark.parametrize("text, message", [
    ("a: &x 1\nb: *x\n", "aliases are not allowed"),
    ("a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n", "levels deep"),
    ("? [a, b]\n: 1\n", "a mapping key must be a plain value"),
    ("a: 1\na: 2\n", "duplicate key 'a'"),
    ("a: 1\n---\nb: 2\n", "but found another document"),
    ("a: !custom 1\n", "could not determine a constructor"),
])
def test_refusals_match_the_full_loader(tmp_path, text, message):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(QsearchError, match=message):
        load_yaml(f)


def test_merge_keys_and_tagged_collections_go_to_the_full_loader(tmp_path):
    for text in ("base: {x: 1}\nother:\n  <<: {x: 2}\n  y: 3\n", "s: !!set {a, b}\n"):
        with pytest.raises(Unusual):
            load(text, LinedDict, MAX_DEPTH)
        f = tmp_path / "x.yaml"
        f.write_text(text)
        assert load_yaml(f) == yaml.safe_load(text)
