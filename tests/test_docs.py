"""`make docs`: the API reference builds from the docstrings, without warnings."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_reference_builds(tmp_path):
    pytest.importorskip("pdoc")
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    modules = re.search(r"DOC_MODULES := (.*?)\n(?!\t)", makefile, re.S).group(1).replace("\\", " ").split()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "pdoc", "-o", str(tmp_path), *modules], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Warn" not in r.stderr, r.stderr
    pages = {os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs}
    for page in ("index.html", "neptune_ext.html", "neptune_ext/nn.html", "neptune_ext/graph.html",
                 "neptune_ext/ops.html"):
        assert page in pages, sorted(pages)
    nn_page = open(os.path.join(tmp_path, "neptune_ext", "nn.html")).read()
    assert "GraphAttention" in nn_page and "fuse_stages" in nn_page
