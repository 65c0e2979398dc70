"""A change's speed against another commit's, side by side in one run (CPU).

    python -m neptune_app.bench.ab --base REV [--cases transformer,layer,gatv2]
        [--rounds 5] [--steps 3] [--json FILE]

Exports commit REV into a temporary folder, builds its extension there (CPU only), then
times the same cases with each tree in turn, alternating run by run (base, this tree, base,
...; each run a fresh process that imports that tree's neptune_ext), and reports each
case's median forward + backward per tree and their ratio. This tree is the working tree
as built (``make build``). A case is a contender of ``neptune_app.bench.graph_attention``
(its power-law graph, 1M edges unless told): ``transformer``, ``layer`` (GraphAttention), ``gatv2``, ``op``.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from . import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = {"transformer": "transformer:neptune", "layer": "layer:neptune", "gatv2": "gatv2:neptune",
         "op": "op:neptune"}


def _git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def export_and_build(rev: str, dest: str) -> str:
    """Commit ``rev`` exported to ``dest`` and its extension built there (CPU only); its
    full hash."""
    sha = _git("rev-parse", "--verify", rev + "^{commit}")
    archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    print(f"building {sha[:10]} in {dest} (CPU only; a few minutes)", file=sys.stderr, flush=True)
    env = dict(os.environ, NEPTUNE_CUDA="0", NEPTUNE_REQUIRE_EXT="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:  # (the folder goes with the temporary directory: the log's tail here)
        tail = "\n".join(r.stdout.strip().splitlines()[-30:])
        raise SystemExit(f"{tail}\nneptune_app.bench.ab: the build of {sha[:10]} failed (its output above)")
    return sha


def _point(tree: str, case: str, steps: int, threads: int, nodes: int = 100_000,
           edges: int = 1_000_000) -> dict:
    """One run: a fresh process importing ``tree``'s packages times ``steps`` steps of the
    case (after a warm-up step) and prints their median forward and backward."""
    code = (
        "import json, statistics, sys, torch\n"
        f"torch.set_num_threads({threads})\n"
        "import os, neptune_ext, neptune_app.bench.graph_attention as ga\n"
        "from neptune_ext import backend\n"
        f"tree = os.path.realpath({tree!r})\n"
        "assert os.path.realpath(neptune_ext.__file__).startswith(tree + os.sep), (neptune_ext.__file__, tree)\n"
        "assert 'cpu' in backend.compiled_backends(), 'this tree has no compiled CPU kernels (build it)'\n"
        f"run = ga.make_case({CASES[case]!r}, {nodes}, {edges}, 4, 32, 128)\n"
        "run()\n"
        f"r = [run() for _ in range({steps})]\n"
        "print(json.dumps({k: statistics.median(x[k] for x in r) for k in ('forward', 'backward')}))\n")
    env = dict(os.environ, PYTHONPATH=tree)
    env.pop("NEPTUNE_FORCE_REFERENCE", None)  # (the kernels are what is compared)
    r = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{tail}\nneptune_app.bench.ab: a run of {case!r} in {tree} failed (its error above)")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare against (any git revision)")
    p.add_argument("--cases", default="transformer,layer,gatv2", help="comma list of: " + ", ".join(CASES))
    p.add_argument("--rounds", type=int, default=5, help="runs per tree, alternated")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--nodes", type=int, default=100_000, help="nodes of the power-law graph")
    p.add_argument("--edges", type=int, default=1_000_000, help="its edges")
    p.add_argument("--json", help="write the figures to this file")
    a = p.parse_args(argv)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        p.error(f"--cases: expected a comma list of {', '.join(CASES)}, got {a.cases!r}")
    if a.rounds < 1 or a.steps < 1 or a.nodes < 1 or a.edges < 1 or (a.threads is not None and a.threads < 1):
        p.error("--rounds, --steps, --nodes, --edges and --threads must be at least 1")
    import torch
    threads = a.threads or torch.get_num_threads()
    head = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    with tempfile.TemporaryDirectory(prefix="neptune-ab-") as tmp:
        base_sha = export_and_build(a.base, tmp)
        trees = {"base": tmp, "this": ROOT}
        times = {c: {t: [] for t in trees} for c in cases}
        t0 = time.perf_counter()
        for r in range(a.rounds):
            for c in cases:
                for t, tree in trees.items():  # base, this, base, this, ...
                    x = _point(tree, c, a.steps, threads, a.nodes, a.edges)
                    times[c][t].append(1e3 * (x["forward"] + x["backward"]))
            print(f"  round {r + 1}/{a.rounds} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    results = {}
    rows = []
    for c in cases:
        base_ms, this_ms = (statistics.median(times[c][t]) for t in ("base", "this"))
        results[c] = {"base_ms": base_ms, "this_ms": this_ms, "speedup": base_ms / this_ms,
                      "base_runs_ms": times[c]["base"], "this_runs_ms": times[c]["this"]}
        rows.append([c, f"{base_ms:.1f}", f"{this_ms:.1f}", f"{base_ms / this_ms:.3f}x"])
    common.print_table(rows, [f"case (fwd+bwd, {a.edges:,} edges)", f"base {base_sha[:10]} ms",
                              "this tree ms", "speedup"])
    report = {"benchmark": "ab", "machine": common.machine(), "torch": torch.__version__,
              "threads": threads, "base_commit": base_sha, "this_commit": head, "this_tree_modified": dirty,
              "config": {"nodes": a.nodes, "edges": a.edges, "heads": 4, "channels": 32,
                         "in_channels": 128, "rounds": a.rounds, "steps": a.steps},
              "results": results}
    common.write_json(a.json, report)
    return report


if __name__ == "__main__":
    main()
