"""The two packages: `neptune_ext` is the library, `neptune_app` the application built on it.

The library never imports the application (not even inside a function), `import neptune_ext`
loads neither PyG nor the application (its layers, `neptune_ext.nn`, load on first use), no
import cycle joins the top-level modules or the application's modules, and a wheel holds both
packages, the embedded data set and the `neptune` script."""
import ast
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY, APP = "neptune_ext", "neptune_app"
TOP_LEVEL = (LIBRARY, APP, "neptune_cli")  # neptune_cli: the command's old home, if it returns


def _python(code, **env):
    """Run `code` in a fresh interpreter (other tests' imports cannot hide a leak)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().splitlines()[-1]


def _modules(top):
    """{module name: path} of every module of a top-level package or module."""
    found = {}
    if os.path.isfile(os.path.join(ROOT, top + ".py")):
        found[top] = os.path.join(ROOT, top + ".py")
    for path in glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if rel[-1] == "__init__":
            rel = rel[:-1]
        found[".".join(rel)] = path
    return found


def _imports(name, path):
    """The absolute names of everything a module imports, at module level or in a function,
    with `import x`, `from x import y` (y too, it may be a module), `importlib.import_module`
    or `__import__` of a constant name."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()

    def resolve(module, level):
        if not level:
            return module or ""
        base = package.split(".")
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(node.module, node.level)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if fname in ("import_module", "__import__"):
                target = node.args[0].value
                if target.startswith(".") and len(node.args) > 1:  # import_module(".x", __name__)
                    level = len(target) - len(target.lstrip("."))
                    target = resolve(target.lstrip("."), level)
                out.add(target)
    return out


def _graph(tops):
    """module -> the modules (of `tops`) it imports."""
    mods = {}
    for top in tops:
        mods.update(_modules(top))
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imp in _imports(name, path):
            while imp and imp not in mods:  # `from pkg import name`: the longest module prefix
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                targets.add(imp)
        graph[name] = targets
    return graph


def _cycle(graph):
    """One cycle of the directed graph as a list of nodes, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_import_neptune_ext_loads_neither_pyg_nor_the_application():
    leaked = _python("import sys, neptune_ext\n"
                     "print([m for m in sys.modules if m.startswith(('torch_geometric', 'neptune_app', "
                     "'neptune_cli', 'neptune_ext.nn'))])")
    assert leaked == "[]", leaked


def test_the_lazy_names_work_as_before():
    out = _python(
        "import sys, neptune_ext\n"
        "from neptune_ext import fuse_stages, stage_paths, Graph, ops\n"
        "import neptune_ext.nn as nn\n"
        "assert fuse_stages is neptune_ext.fuse_stages is nn.fuse_stages\n"
        "assert stage_paths is neptune_ext.stage_paths is nn.stage_paths\n"
        "assert neptune_ext.nn is sys.modules['neptune_ext.nn'] and nn.GraphAttention.__module__ "
        "== 'neptune_ext.attention.gat_layer'\n"
        "assert callable(neptune_ext.ops.sparse_graph_attention) and neptune_ext.Graph is Graph\n"
        "assert {'nn', 'fuse_stages', 'stage_paths', 'info'} <= set(dir(neptune_ext))\n"
        "try:\n    neptune_ext.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n"
        "else:\n    raise AssertionError('no AttributeError')\n"
        "print('ok')")
    assert out == "ok"


def test_a_pickled_model_loads_in_a_process_that_imported_only_torch(tmp_path):
    path = tmp_path / "model.pt"
    _python("import torch, neptune_ext\n"
            "m = torch.nn.Sequential(neptune_ext.nn.GraphAttention(8, 4, heads=2), neptune_ext.nn.Stage(3, 4, 3))\n"
            f"torch.save(m, {str(path)!r})\nprint('saved')")
    out = _python("import torch\n"
                  f"m = torch.load({str(path)!r}, weights_only=False)\n"
                  "import neptune_ext\n"
                  "assert isinstance(m[0], neptune_ext.nn.GraphAttention) and isinstance(m[1], neptune_ext.nn.Stage)\n"
                  "print(type(m[0]).__name__)")
    assert out == "GraphAttention"


def test_the_application_package_and_its_parser_import_no_torch():
    out = _python("import sys, neptune_app, neptune_app.cli, neptune_app.options\n"
                  "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'neptune_ext')])")
    assert out == "[]", out


def test_the_library_never_imports_the_application():
    bad = []
    for name, path in _modules(LIBRARY).items():
        for imp in _imports(name, path):
            if imp.split(".")[0] in (APP, "neptune_cli"):
                bad.append(f"{os.path.relpath(path, ROOT)} imports {imp}")
    assert not bad, bad


def test_the_scan_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The checks above are only as good as _imports: it finds lazy and relative imports."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def f():\n    import neptune_app.cli\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "m.py").write_text(
        "import importlib\nfrom .. import x\nfrom ..y import z\n"
        "def g():\n    importlib.import_module('neptune_app.train')\n    __import__('neptune_cli')\n")
    assert "neptune_app.cli" in _imports("pkg", str(pkg / "__init__.py"))
    found = _imports("pkg.sub.m", str(pkg / "sub" / "m.py"))
    assert {"pkg", "pkg.x", "pkg.y", "pkg.y.z", "neptune_app.train", "neptune_cli"} <= found
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_the_top_level_modules():
    graph = _graph(TOP_LEVEL)
    top = {t: set() for t in TOP_LEVEL}
    for src, targets in graph.items():
        for t in targets:
            a, b = src.split(".")[0], t.split(".")[0]
            if a != b:
                top[a].add(b)
    assert top[LIBRARY] == set(), top
    assert _cycle(top) is None, top


def test_no_import_cycle_inside_the_application():
    graph = _graph((APP,))
    app_only = {n: {t for t in ts if t.split(".")[0] == APP} for n, ts in graph.items()}
    # a package's __init__ importing its own submodules is not a cycle of the code's layers
    for n, ts in app_only.items():
        ts.discard(n.rpartition(".")[0])
    assert _cycle(app_only) is None, _cycle(app_only)


def test_a_wheel_holds_both_packages_the_data_and_the_script(tmp_path):
    """`pip install .` installs both packages: a wheel built from this tree (without the C++
    extension, NEPTUNE_SKIP_EXT=1, so it takes seconds) holds them, digits.npz and the script."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    src.mkdir()
    for rel in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, rel), src / rel)
    for rel in ("build_backend", LIBRARY, APP):
        shutil.copytree(os.path.join(ROOT, rel), src / rel,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", ".built", "_build_note.txt"))
    env = dict(os.environ, NEPTUNE_SKIP_EXT="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {LIBRARY, APP}, tops
    for needed in ("neptune_app/data/digits.npz", "neptune_app/cli.py", "neptune_app/options.py",
                   "neptune_app/bench/suite.py", "neptune_ext/nn/__init__.py", "neptune_ext/ops/__init__.py"):
        assert needed in names, needed
    assert "neptune = neptune_app.cli:main" in entry, entry


def test_no_import_cycle_inside_the_library():
    """The library's layers (graph, attention, stage, the public faces) import downward only."""
    graph = _graph((LIBRARY,))
    lib = {n: {t for t in ts if t in graph} for n, ts in graph.items()}
    for n, ts in lib.items():  # `from .. import x` names the package, which is not a layer
        parts = n.split(".")
        for i in range(1, len(parts)):
            ts.discard(".".join(parts[:i]))
        ts.discard(n)
    assert _cycle(lib) is None, _cycle(lib)


def test_the_old_module_names_import_as_the_new_modules():
    """The names from before the layout by concept still import (for one release), as the very
    module of the new name, with a DeprecationWarning naming the new one."""
    from neptune_ext._aliases import OLD_NAMES
    out = _python(
        "import importlib, warnings, neptune_ext\n"
        f"names = {dict(OLD_NAMES)!r}\n"
        "for old, new in names.items():\n"
        "    with warnings.catch_warnings(record=True) as w:\n"
        "        warnings.simplefilter('always')\n"
        "        m = importlib.import_module(old)\n"
        "    assert m is importlib.import_module(new), old\n"
        "    assert any(new in str(x.message) for x in w), (old, [str(x.message) for x in w])\n"
        "print(len(names))")
    assert out == str(len(OLD_NAMES))
    for old, new in OLD_NAMES.items():  # a new name is a real file; an old one is not
        assert os.path.isfile(os.path.join(ROOT, *new.split(".")) + ".py"), new
        assert not os.path.exists(os.path.join(ROOT, *old.split(".")) + ".py"), old


def test_a_model_pickled_under_the_old_module_names_loads():
    """A model pickled before the move names its classes by their old modules."""
    import pickle
    import torch
    from neptune_ext._aliases import OLD_NAMES
    import neptune_ext
    torch.manual_seed(0)
    m = torch.nn.Sequential(neptune_ext.nn.Stage(3, 4, 3), neptune_ext.nn.GraphAttention(8, 4, heads=2)).eval()
    blob = pickle.dumps(m, protocol=2)  # protocol 2 names a class as "module\nname\n"
    for old, new in sorted(OLD_NAMES.items(), key=lambda kv: -len(kv[1])):
        blob = blob.replace(f"c{new}\n".encode(), f"c{old}\n".encode())
    assert b"cneptune_ext.nn.stage\nStage\n" in blob and b"neptune_ext.nn.graph_attention\n" in blob
    for old in OLD_NAMES:  # imported earlier in this process: resolve them afresh
        sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning):
        back = pickle.loads(blob)
    x = torch.randn(2, 3, 5, 5)
    assert type(back[0]) is type(m[0]) and type(back[1]) is type(m[1])
    torch.testing.assert_close(back[0](x), m[0](x), rtol=0, atol=0)
