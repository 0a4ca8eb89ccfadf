"""Params validation, fuzzed: hundreds of generated bad params files (wrong types, missing keys,
unknown keys, out-of-range values, malformed YAML, bytes that are not text). Each one either
loads (a mutation can be valid) or ends in one clear `params:` line: never another exception."""

import copy
import dataclasses

import yaml
from conftest import ROOT, cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import params
from pipeline.errors import UserError

VALID = yaml.safe_load((ROOT / "params.yaml").read_text())


def _paths(node, prefix=()):
    """Every key path of the committed params, sections and leaves, list items included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))


PATHS = list(_paths(VALID))

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "same", "none", "cpu", "2", "0.5", "1e999", "", "[]"]),
    st.lists(st.one_of(st.integers(-3, 30), st.floats(-1, 2), st.text(max_size=4)), max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), st.integers(), max_size=3),
)


@st.composite
def mutated(draw):
    raw = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = raw
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = draw(junk)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.one_of(st.text(max_size=8), st.integers()))] = draw(junk)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced this path's parent
    return raw


def _required(field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def must_reject(raw) -> str | None:
    """An independent rule, from the schema's declaration alone (which keys exist, which are
    required, which hold a section): a reason this file cannot be valid, or None when it may be.
    It sees only structure, so it is sure of fewer files than the validator; where it is sure,
    the validator must agree."""
    if not isinstance(raw, dict):
        return "not a mapping"
    top = {f.name: f for f in dataclasses.fields(params.Params)}
    if unknown := sorted(set(raw) - set(top), key=str):
        return f"unknown key {unknown[0]!r}"
    for name, field in top.items():
        section = params._SECTIONS.get(name)
        if name not in raw:
            if section is not None or _required(field):
                return f"missing {name}"
            continue
        if section is None:
            if isinstance(raw[name], dict):
                return f"{name} is a mapping"
            continue
        if not isinstance(raw[name], dict):
            return f"section {name} is not a mapping"
        fields = {g.name: g for g in dataclasses.fields(section)}
        for key, value in raw[name].items():
            if key not in fields:
                return f"unknown key {name}.{key!r}"
            if isinstance(value, dict):
                return f"{name}.{key} is a mapping"
        for key, g in fields.items():
            if key not in raw[name] and _required(g):
                return f"missing {name}.{key}"
    return None


def _check(path, raw=None):
    try:
        params.load(path)
    except UserError as e:
        message = str(e)
        assert message.startswith("params:") and "\n" not in message, message
        return
    reason = must_reject(raw) if raw is not None else None
    assert reason is None, f"the validator accepted a file with {reason}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mutated())
def test_mutated_params_load_or_fail_with_one_line(tmp_path, raw):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    _check(path, raw)


def test_the_independent_rule_rejects_what_it_must_and_accepts_the_committed_file():
    assert must_reject(VALID) is None
    params.load(ROOT / "params.yaml")
    for edit, reason in (
        (lambda r: r["model"].pop("dim"), "missing model.dim"),
        (lambda r: r["pretrain"].update(epoch=3), "unknown key pretrain.'epoch'"),
        (lambda r: r.update(probe=[1]), "section probe is not a mapping"),
        (lambda r: r.update(seed={"a": 1}), "seed is a mapping"),
    ):
        raw = copy.deepcopy(VALID)
        edit(raw)
        assert must_reject(raw) == reason


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blob=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        st.sampled_from(
            [
                b"seed: [1,\n",
                b"\tseed: 0",
                b"a: b: c",
                b"{",
                b"- x\n- y",
                b"\xff\xfe",
                b"seed: !!python/object:os.system ls",
                b"seed: &a [*a]",
            ]
        ),
    )
)
def test_malformed_files_fail_with_one_line(tmp_path, blob):
    path = tmp_path / "params.yaml"
    path.write_bytes(blob)
    _check(path)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mutated())
def test_cli_on_a_mutated_file_is_ok_or_exit_2_one_line_and_no_outputs(tmp_path_factory, raw):
    """The CLI agrees with `params.load`: a file it refuses stops `validate` with its one line and
    nothing written; a file it accepts passes `validate` (or fails there with one line when the
    machine cannot do what it asks, such as device: cuda without a GPU)."""
    repo = tmp_path_factory.mktemp("fuzz")
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        p = params.load(repo / "params.yaml")
        refused = None
    except UserError as e:
        refused = str(e)
    out = cli(repo, "validate")
    lines = out.stderr.strip().splitlines()
    if refused is None and out.returncode == 0:
        assert out.stdout.startswith(f"params.yaml: ok ({len(p.cells())} grid cells)"), out.stdout
    else:
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert len(lines) == 1, out.stderr
        if refused:
            assert lines[0] == f"maepipe: error: {refused}"
        else:
            assert lines[0].startswith("maepipe: error: params: device = "), lines[0]
    assert sorted(x.name for x in repo.iterdir()) == ["params.yaml"]
