"""Bad model YAMLs, fuzzed: every row either builds or raises the package's own error naming the layer.

For every registered block (:data:`so_det_ultra.registry.BLOCKS`), Hypothesis writes a tiny model YAML: four
fixed rows (:data:`BASE`), then one row of that block with mutated arguments (taken from the shipped YAMLs, then
dropped, added or swapped for values of the wrong type), ``from`` indices good and bad, repeat counts of the wrong
type, and scales whose width or ``max_channels`` make channels 0. Only ``parse_model`` runs (no forward pass).
Every case must return a model or raise :class:`~so_det_ultra.registry.ModelBuildError` /
:class:`~so_det_ultra.registry.UnknownBlockError` whose message names the failing layer's index and module; a bare
``IndexError``, ``TypeError``, ``ZeroDivisionError`` or torch ``RuntimeError`` fails the test.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import so_det_ultra
from so_det_ultra.registry import BLOCKS, ModelBuildError, UnknownBlockError

REPO = Path(__file__).resolve().parents[1]
BASE = [  # 16, 32, 32 channels at width 1, then a 1-channel ObjectSeeker (SeekerDetect's last input)
    [-1, 1, "Conv", [16, 3, 2]],
    [-1, 1, "Conv", [32, 3, 2]],
    [-1, 1, "Conv", [32, 3, 1]],
    [-1, 1, "ObjectSeeker", [3]],
]
GOOD_FROM = [-1, 0, 1, 2, 3]
BAD_FROM = [4, 9, -9, "a", None, 1.5, [], [-1, 9], [[-1]], [-1, "x"]]
WRONG = st.one_of(
    st.integers(-3, 48),
    st.sampled_from([0.5, 0.0, -1.0, float("nan"), float("inf")]),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.sampled_from(["nc", "cosine", "nearest", "max"]),
    st.lists(st.integers(-1, 32), max_size=3),
    st.dictionaries(st.sampled_from(["sr", "sr_detach", "bogus", "hd"]), st.booleans(), max_size=2),
)


def _templates() -> dict:
    """``{block: [args, ...]}`` from the shipped model YAMLs (an empty and a one-number row for blocks they lack)."""
    import so_det_ultra.nn  # noqa: F401  (registers every block)

    out = {name: [[], [16]] for name in BLOCKS.names()}
    for path in sorted((REPO / "cfg" / "models").glob("*.yaml")):
        d = yaml.safe_load(path.read_text())
        for _, _, m, args in d.get("backbone", []) + d.get("head", []):
            if m in out and args not in out[m]:
                out[m].append(args)
    return out


TEMPLATES = _templates()


@st.composite
def block_yaml(draw, block: str) -> dict:
    """A model dict: :data:`BASE` plus one (rarely two) fuzzed ``block`` rows, at a fuzzed scale."""
    args = list(draw(st.sampled_from(TEMPLATES[block])))
    op = draw(st.sampled_from(["keep", "keep", "drop", "add", "swap"]))
    if op == "drop" and args:
        args.pop(draw(st.integers(0, len(args) - 1)))
    elif op == "add":
        args.append(draw(WRONG))
    elif op == "swap" and args:
        args[draw(st.integers(0, len(args) - 1))] = draw(WRONG)
    f = draw(
        st.one_of(
            st.sampled_from(GOOD_FROM),
            st.lists(st.sampled_from(GOOD_FROM), min_size=1, max_size=4),
            st.sampled_from(BAD_FROM),
        )
    )
    n = draw(st.sampled_from([1, 1, 1, 2, 0, -1, "2", 1.5, None]))
    rows = [*BASE, [f, n, block, args]]
    if draw(st.integers(0, 4)) == 0:  # a second row reading the first one
        rows.append([[-1, 4][draw(st.integers(0, 1))], 1, block, list(args)])
    depth = draw(st.sampled_from([1.0, 0.33, 0.0]))
    width = draw(st.sampled_from([1.0, 0.25, 0.01, 0.0]))
    max_channels = draw(st.sampled_from([1024, 64, 8, 0]))
    return {
        "nc": 3,
        "scales": {"t": [depth, width, max_channels]},
        "scale": "t",
        "backbone": rows[:4],
        "head": rows[4:],
    }


def _module_name(row) -> str:
    return str(row[2])


@pytest.fixture(scope="module")
def parse_model():
    import ultralytics.nn.tasks as tasks

    so_det_ultra.register()
    return tasks.parse_model


def _check(parse_model, d: dict):
    """Build ``d``; on failure the error must be ours and name a layer index and that layer's module."""
    rows = d["backbone"] + d["head"]
    text = yaml.safe_dump(d)  # parse_model resolves string arguments in place: report the YAML as generated
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero-element tensors warn at init; not what this test checks
            model, _ = parse_model(d, ch=3, verbose=False)
    except (ModelBuildError, UnknownBlockError) as err:
        msg = str(err)
        found = re.search(r"model YAML layer (\d+) \(", msg)
        assert found, f"error does not name the layer:\n{msg}\nYAML:\n{text}"
        i = int(found.group(1))
        assert i < len(rows) and _module_name(rows[i]) in msg, f"error names the wrong layer:\n{msg}\nYAML:\n{text}"
        return False
    assert len(model) == len(rows)
    return True


@pytest.mark.parametrize("block", sorted(TEMPLATES))
@settings(
    max_examples=int(os.environ.get("SO_DET_FUZZ_EXAMPLES", 20)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_rows_build_or_raise_our_error(parse_model, block, data):
    _check(parse_model, data.draw(block_yaml(block)))


@pytest.mark.parametrize("block", sorted(TEMPLATES))
def test_shipped_arguments_build(parse_model, block):
    """The fuzz is not vacuous: each block builds with at least one of its template rows and a good ``from``."""
    built = 0
    for args in TEMPLATES[block]:
        for f in (-1, [1, 2], [1, 2, 3], [2, 2]):
            d = {"nc": 3, "backbone": [list(r) for r in BASE], "head": [[f, 1, block, list(args)]]}
            d["scales"], d["scale"] = {"t": [1.0, 1.0, 1024]}, "t"
            built += _check(parse_model, d)
    assert built, f"{block} never built from {TEMPLATES[block]}"


def test_missing_scale_names_the_available_ones(parse_model):
    d = {"nc": 3, "scales": {"s": [1, 0.25, 1024], "m": [1, 0.5, 1024]}, "scale": "n", "backbone": BASE, "head": []}
    with pytest.raises(ModelBuildError, match=r"no scale 'n'; its scales are s, m"):
        parse_model(d, ch=3, verbose=False)


def test_missing_scale_from_a_shipped_yaml_name():
    """``so-det-p-n.yaml`` (the YAML has s, m, l): a clear error instead of Ultralytics' bare ``KeyError: 'n'``."""
    from ultralytics.nn.tasks import DetectionModel

    so_det_ultra.register()
    with pytest.raises(ModelBuildError, match=r"so-det-p-n\.yaml has no scale 'n'; its scales are s, m, l"):
        DetectionModel("so-det-p-n.yaml", verbose=False)
