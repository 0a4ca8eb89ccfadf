"""Params validation, fuzzed: hundreds of generated bad params files (wrong types, missing keys,
unknown keys, out-of-range values, malformed YAML, bytes that are not text). Each one either
loads (a mutation can be valid) or ends in one clear `params:` line: never another exception."""
import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, cli
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
    st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "same", "none", "cpu", "2", "0.5", "1e999", "", "[]"]),
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


def _check(path):
    try:
        params.load(path)
    except UserError as e:
        message = str(e)
        assert message.startswith("params:") and "\n" not in message, message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mutated())
def test_mutated_params_load_or_fail_with_one_line(tmp_path, raw):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    _check(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                      st.sampled_from([b"seed: [1,\n", b"\tseed: 0", b"a: b: c", b"{", b"- x\n- y", b"\xff\xfe",
                                       b"seed: !!python/object:os.system ls", b"seed: &a [*a]"])))
def test_malformed_files_fail_with_one_line(tmp_path, blob):
    path = tmp_path / "params.yaml"
    path.write_bytes(blob)
    _check(path)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mutated())
def test_cli_on_a_bad_file_is_exit_2_one_line_and_no_outputs(tmp_path_factory, raw):
    repo = tmp_path_factory.mktemp("fuzz")
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        params.load(repo / "params.yaml")
        return  # a valid mutation: running it is the pipeline's business, not this test's
    except UserError:
        pass
    out = cli(repo, "data")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maepipe: error: params:"), out.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["params.yaml"]
