"""Turn a fetched gpu_check.sh output folder into recorded results and the README's GPU tables.

    python scripts/gpu_results.py OUT [--results benchmarks/results] [--readme README.md]
                                      [--date YYYY-MM-DD] [--dry-run]

For every benchmark JSON in OUT (bench.json, user_graphs_*.json, stage_bench.json,
cnn_bench_*.json, ...) it writes ``<results>/<device>-<date>-<what>.json``: the figures as
measured, with the run's device, torch, CUDA, commit and timestamp (from OUT/env.json) added
where the file lacks them. It then rewrites the part of the README between the markers

    <!-- gpu-results:begin -->  ...  <!-- gpu-results:end -->

with what the run shows: its environment, each step's PASS/FAIL line (OUT/summary.txt), and
one table per recorded file, every figure citing its file. Nothing is typed by hand. The
graph-attention benchmark's files (bench.json, bench_transformer.json: results keyed by
graph/dtype, each with its "contenders") get one row per contender: times, the ratios to its
peers (GraphTransformer vs TransformerConv and torch.compile(TransformerConv), ...), peak
memory, compile time, OOM.
"""
import argparse
import datetime
import json
import os
import re
import sys

BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
SKIP = {"env.json"}
MAX_COLUMNS = 10


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'h200': the file-name prefix of a device."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", text or "gpu") if w and w.upper() != "NVIDIA"]
    return (words[0] if words else "gpu").lower()


def load_env(out: str) -> dict:
    path = os.path.join(out, "env.json")
    if not os.path.exists(path):
        raise SystemExit(f"gpu_results.py: {path} is missing: is {out} a gpu_check.sh output folder?")
    with open(path) as f:
        return json.load(f)


def _flat(row: dict, prefix: str = "") -> dict:
    """One level of nesting flattened ({'median_ms': {'a': 1}} -> {'median_ms.a': 1});
    numbers and strings only."""
    flat = {}
    for k, v in row.items():
        if isinstance(v, dict) and not prefix:
            flat.update(_flat(v, f"{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            flat[prefix + k] = v
    return flat


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _ratios(ratios, unit: str = "") -> str:
    """({'pyg': 3.1, 'pyg_compiled': 'peer OOM'}, 'x') -> 'vs pyg 3.1x; vs pyg_compiled peer OOM'."""
    if not isinstance(ratios, dict):
        return ""
    return "; ".join(f"vs {k} {_fmt(v)}{unit if isinstance(v, (int, float)) else ''}"
                     for k, v in ratios.items())


def contender_rows(results):
    """The graph-attention benchmark's results ({case: {..., "contenders": {name: record}}})
    as one row per contender; None for results of any other shape."""
    if not isinstance(results, dict) or not results or not all(
            isinstance(v, dict) and isinstance(v.get("contenders"), dict) for v in results.values()):
        return None
    rows = []
    for case, res in results.items():
        for name, rec in res["contenders"].items():
            rec = rec if isinstance(rec, dict) else {"result": rec}
            peak = rec.get("peak_bytes")
            rows.append({"case": case, "contender": name, "fwd ms": rec.get("forward_ms"),
                         "bwd ms": rec.get("backward_ms"), "fwd+bwd ms": rec.get("total_ms"),
                         "speedup": _ratios(rec.get("speedup_vs"), "x"),
                         "peak GiB": peak / 2**30 if isinstance(peak, (int, float)) else None,
                         "memory": _ratios(rec.get("memory_vs")),
                         "compile s": rec.get("compile_seconds"), "result": rec.get("result")})
    keep = [c for c in (rows[0] if rows else ()) if any(r.get(c) not in (None, "") for r in rows)]
    return [{c: r.get(c) for c in keep} for r in rows]  # columns empty in every row: left out


def table(report: dict) -> list:
    """Markdown lines: the report's ``results`` (a list of records, or a dict of them) as a
    table of its scalar fields (at most MAX_COLUMNS columns, the first ones); the
    graph-attention benchmark's results one row per contender (contender_rows)."""
    results = report.get("results")
    rows = contender_rows(results)
    if rows is None and isinstance(results, dict):
        rows = [dict(case=k, **(_flat(v) if isinstance(v, dict) else {"value": v}))
                for k, v in results.items()]
    elif rows is None and isinstance(results, list):
        rows = [_flat(r) for r in results if isinstance(r, dict)]
    elif rows is None:
        rows = []
    if not rows:
        return ["(no per-case results in this file)"]
    cols = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    cols = cols[:MAX_COLUMNS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return lines


def record(out: str, results_dir: str, date: str, dry_run: bool = False):
    """[(path, report)] for every benchmark JSON in ``out``, written under ``results_dir``."""
    env = load_env(out)
    prefix = slug(env.get("device") or "")
    written = []
    for name in sorted(os.listdir(out)):
        if not name.endswith(".json") or name in SKIP:
            continue
        with open(os.path.join(out, name)) as f:
            try:
                report = json.load(f)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"gpu_results.py: {name} is not valid JSON ({exc}): the step that "
                                 "wrote it probably ran out of its budget") from None
        if not isinstance(report, dict):
            report = {"results": report}
        for key in ("device", "torch", "cuda", "commit", "timestamp"):
            report.setdefault(key, env.get(key))
        what = re.sub(r"[^a-z0-9]+", "-", os.path.splitext(name)[0].lower()).strip("-")
        path = os.path.join(results_dir, f"{prefix}-{date}-{what}.json")
        if not dry_run:
            os.makedirs(results_dir, exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        written.append((path, report))
    return env, written


def readme_section(env: dict, summary_lines: list, written: list, root: str) -> str:
    lines = [BEGIN, "",
             f"Generated by `scripts/gpu_results.py` from `scripts/gpu_check.sh`'s output: "
             f"{env.get('device')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, commit "
             f"`{(env.get('commit') or 'unknown')[:7]}`, {env.get('timestamp')}.", ""]
    steps = [ln for ln in summary_lines if ln.startswith(("PASS", "FAIL"))]
    if steps:
        lines += ["Steps:", "", "```"] + steps + ["```", ""]
    for path, report in written:
        rel = os.path.relpath(path, root)
        lines += [f"`{rel}`:", ""]
        if report.get("complete") is False:  # a benchmark that writes as it goes, cut short
            lines += ["(incomplete: its step ended before the benchmark did; what it measured)", ""]
        lines += table(report) + [""]
    lines.append(END)
    return "\n".join(lines)


def update_readme(readme: str, section: str, dry_run: bool = False) -> None:
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"gpu_results.py: {readme} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + section + tail
    if dry_run:
        print(section)
        return
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, readme)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder gpu_check.sh wrote ($OUT), fetched here")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--date", help="YYYY-MM-DD in the file names (default: the run's date)")
    p.add_argument("--dry-run", action="store_true", help="write nothing; print the README section")
    a = p.parse_args(argv)
    if not os.path.isdir(a.out):
        p.error(f"{a.out} is not a folder")
    env = load_env(a.out)
    date = a.date or (env.get("timestamp") or datetime.date.today().isoformat())[:10]
    env, written = record(a.out, a.results, date, a.dry_run)
    summary = []
    spath = os.path.join(a.out, "summary.txt")
    if os.path.exists(spath):
        with open(spath) as f:
            summary = [ln.rstrip("\n") for ln in f]
    root = os.path.dirname(os.path.abspath(a.readme))
    update_readme(a.readme, readme_section(env, summary, written, root), a.dry_run)
    for path, _ in written:
        print(("would write " if a.dry_run else "wrote ") + path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
