"""CBSpec: validation at construction, layer selection against a depth, and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from cbtool.errors import SpecError
from cbtool.spec import CBSpec


@pytest.mark.parametrize(
    "layers, depth, expected",
    [
        ("all", 4, (0, 1, 2, 3)),
        ("ALL", 2, (0, 1)),
        (" all ", 1, (0,)),
        ("0,2,5-7", 8, (0, 2, 5, 6, 7)),
        ("5-7,0,2", 8, (0, 2, 5, 6, 7)),
        ("-1", 12, (11,)),
        ("-2--1", 12, (10, 11)),
        ("0,-1", 3, (0, 2)),
        ("1-2", 3, (1, 2)),
        (" 1 - 3 ", 6, (1, 2, 3)),
        ("1 , 2", 6, (1, 2)),
        ("2-2", 3, (2,)),
        ("0-1,1-2", 3, (0, 1, 2)),  # overlapping ranges select each block once
        ("-3-1", 3, (0, 1)),  # mixed signs: -3 is block 0
        ("1--1", 4, (1, 2, 3)),
        ("0-11", 12, tuple(range(12))),
        ([0, -1], 5, (0, 4)),
        ((2, 1), 5, (1, 2)),
    ],
)
def test_resolve_layers(layers, depth, expected):
    assert CBSpec(layers=layers).resolve_layers(depth) == expected


@pytest.mark.parametrize(
    "layers, message",
    [
        ("a", "bad --layers term 'a'"),
        ("1-", "bad --layers term '1-'"),
        ("-", "bad --layers term '-'"),
        ("--1", "bad --layers term '--1'"),
        ("1-2-3", "bad --layers term '1-2-3'"),
        ("0,,1", "bad --layers term ''"),
        ("0;1", "bad --layers term '0;1'"),
        ("1.5", "bad --layers term '1.5'"),
        ("", "--layers is empty"),
        ("   ", "--layers is empty"),
        (3, "--layers must be a string"),
        (None, "--layers must be a string"),
    ],
)
def test_layer_syntax_refused_at_construction(layers, message):
    with pytest.raises(SpecError, match=_escaped(message)):
        CBSpec(layers=layers)


@pytest.mark.parametrize(
    "layers, depth, message",
    [
        ("3", 3, "layer 3 is out of range for a model with 3 blocks"),
        ("-4", 3, "layer -4 is out of range"),
        ("0,12", 12, "layer 12 is out of range"),
        ("0-12", 12, "layer 12 is out of range"),
        ("3-1", 4, "empty layer range 3-1"),
        ("-1-0", 4, "empty layer range -1-0"),
        ("-1--2", 4, "empty layer range -1--2"),
        ("0", 0, "out of range for a model with 0 blocks"),
    ],
)
def test_layer_range_refused_against_depth(layers, depth, message):
    spec = CBSpec(layers=layers)  # the syntax is fine; only the depth makes it wrong
    with pytest.raises(SpecError, match=_escaped(message)):
        spec.resolve_layers(depth)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "cbx"}, "unknown variant 'cbx': choose one of cb, cbs"),
        ({"variant": "CB"}, "unknown variant 'CB'"),
        ({"position": "ffn"}, "unknown position 'ffn': choose one of mlp, attn, block"),
        ({"scale_init": -0.1}, "scale_init must lie in [0, 1]"),
        ({"scale_init": 1.5}, "scale_init must lie in [0, 1]"),
        ({"scale_init": float("nan")}, "scale_init must lie in [0, 1]"),
        ({"scale_init": "half"}, "scale_init must be a number"),
        ({"scale_init": None}, "scale_init must be a number"),
    ],
)
def test_bad_spec_fields(kwargs, message):
    with pytest.raises(SpecError, match=_escaped(message)):
        CBSpec(**kwargs)


def test_defaults_are_the_paper_setting():
    spec = CBSpec()
    assert (spec.variant, spec.position, spec.layers, spec.scale_init) == ("cb", "mlp", "all", 0.5)


def test_spec_is_frozen():
    spec = CBSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.variant = "cbs"


@pytest.mark.parametrize(
    "spec",
    [
        CBSpec(),
        CBSpec(variant="cbs", position="attn", layers="0,2,5-7", scale_init=0.25),
        CBSpec(variant="cb", position="block", layers=" -2 - -1 "),
        CBSpec(variant="cbs", layers=[3, -1], scale_init=1),
    ],
)
def test_json_round_trip(spec):
    text = spec.to_json()
    decoded = json.loads(text)
    assert list(decoded) == sorted(decoded)  # sorted keys: the same spec always writes the same text
    assert all(isinstance(value, (str, float, int)) for value in decoded.values())
    again = CBSpec.from_json(text)
    assert again == spec
    assert again.to_json() == text
    assert CBSpec.from_dict(spec.to_dict()) == spec


def test_layers_are_stored_normalised():
    assert CBSpec(layers=" 1 - 3 , -1 ").layers == "1-3,-1"
    assert CBSpec(layers=[0, 2]).layers == "0,2"
    assert json.loads(CBSpec(layers="ALL").to_json())["layers"] == "all"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"variant": "cb", "colour": "red"}', "unknown CB spec field(s): colour"),
        ('{"variant": "cb", "b": 1, "a": 2}', "unknown CB spec field(s): a, b"),
        ("[1, 2]", "a CB spec must be a JSON object, got list"),
        ('"cb"', "a CB spec must be a JSON object, got str"),
        ("{not json", "the CB spec is not valid JSON"),
        ('{"variant": "nope"}', "unknown variant 'nope'"),
        ('{"layers": "x"}', "bad --layers term 'x'"),
        ('{"scale_init": "x"}', "scale_init must be a number"),
    ],
)
def test_from_json_refuses(text, message):
    with pytest.raises(SpecError, match=_escaped(message)):
        CBSpec.from_json(text)


def test_from_dict_accepts_partial_fields():
    assert CBSpec.from_dict({"position": "attn"}) == CBSpec(position="attn")


def _escaped(text: str) -> str:
    return re.escape(text)
