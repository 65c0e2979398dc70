"""neptune_app.bench.ab: a change's speed against another commit's, alternated run by run."""
import json

import pytest

from neptune_app.bench import ab


def test_a_point_runs_the_case_with_the_trees_own_compiled_kernels(monkeypatch, tmp_path):
    """One run is a fresh process importing the given tree's neptune_ext with its compiled
    kernels (both checked inside), whatever NEPTUNE_FORCE_REFERENCE the caller has set; a run
    that fails says why."""
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    r = ab._point(ab.ROOT, "transformer", steps=1, threads=1, nodes=200, edges=1_000)
    assert set(r) == {"forward", "backward"} and r["forward"] > 0 and r["backward"] > 0
    # a folder without the packages: the run imports another tree's, and says so
    with pytest.raises(SystemExit, match="(?s)AssertionError.*a run of 'layer' in .* failed"):
        ab._point(str(tmp_path), "layer", steps=1, threads=1, nodes=200, edges=1_000)


def test_runs_alternate_and_the_report_says_what_was_compared(tmp_path, monkeypatch):
    calls = []

    def fake_point(tree, case, steps, threads, nodes, edges):
        calls.append((tree == ab.ROOT, case))
        return {"forward": 0.002, "backward": 0.002} if tree == ab.ROOT else {"forward": 0.003, "backward": 0.003}
    monkeypatch.setattr(ab, "_point", fake_point)
    monkeypatch.setattr(ab, "export_and_build", lambda rev, dest: "f" * 40)
    monkeypatch.setattr(ab, "_git", lambda *args, **kw: "e" * 40 if args[0] == "rev-parse" else "")
    out = tmp_path / "ab.json"
    report = ab.main(["--base", "HEAD", "--cases", "transformer,layer", "--rounds", "2", "--json", str(out)])
    assert calls == [(False, "transformer"), (True, "transformer"), (False, "layer"), (True, "layer")] * 2
    assert json.loads(out.read_text())["results"] == report["results"]
    r = report["results"]["layer"]
    assert r["base_ms"] == pytest.approx(6.0) and r["this_ms"] == pytest.approx(4.0)
    assert r["speedup"] == pytest.approx(1.5) and report["base_commit"] == "f" * 40
    assert report["this_commit"] == "e" * 40 and report["this_tree_modified"] is False


@pytest.mark.parametrize("args", [["--cases", "nope"], ["--cases", ""], ["--rounds", "0"], ["--edges", "0"],
                                  ["--threads", "-1"]])
def test_bad_arguments_are_usage_errors(args):
    with pytest.raises(SystemExit) as exc:
        ab.main(["--base", "HEAD", *args])
    assert exc.value.code == 2
