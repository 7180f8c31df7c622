"""Rewrite the README's "## Performance" section from one benchmark run's results.

    python benchmarks/_readme.py [--results benchmarks/results/results.json] [--readme README.md]
                                 [--check]

or, in one go, ``python benchmarks/run.py --out benchmarks/results --readme README.md``.
Everything between the ``## Performance`` heading and the next ``## `` or ``### `` heading
(hand-written subsections, such as the multi-process figures, are kept) is replaced by text
generated from ``results.json`` alone (plus ``policy_scale.json`` next to it, if
present): the machine, a table of best-of-N figures per state and filesystem with the ratio
to the fastest peer (marked ``~`` where the run judged it unstable), the start-up, memory,
mmap and async figures, and the targets.  Rewriting is idempotent: a second run on the same
results leaves the README byte-identical.  ``--check`` rewrites nothing and exits 1 when the
README's section is not what the results give.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _report  # noqa: E402

HEADING = "## Performance"


def _ms(x: float) -> str:
    return _report._fmt_s(x)


def _fastest(rows: dict, op: str) -> str | None:
    peers = [k for k, v in rows.items() if k not in _report.NOT_PEERS
             and not _report._is_raw(k) and op + "_best" in v]
    return min(peers, key=lambda k: rows[k][op + "_best"]) if peers else None


def _pair(rows: dict, op: str) -> tuple[str, str]:
    """(unickpt's cell, the fastest peer's cell) for ``op`` in one state's rows."""
    u = rows.get("unickpt", {})
    peer = _fastest(rows, op)
    if op + "_best" not in u:
        return "-", "-"
    mine = _ms(u[op + "_best"])
    if u.get(op + "_gbs", 0) >= 0.5:
        mine += f" ({u[op + '_gbs']:.1f} GB/s)"
    if peer is None:
        return mine, "-"
    p = rows[peer]
    mark = "" if p.get(op + "_stable") else " ~"
    return (f"{mine}, **{p[op + '_ratio_best']:.2f}x**{mark}",
            f"{peer} {_ms(p[op + '_best'])}")


def _table(doc: dict, summary: dict) -> list[str]:
    lines = ["| state | on | unickpt save, vs fastest peer | fastest peer save | "
             "unickpt restore, vs fastest peer | fastest peer restore |",
             "|---|---|---|---|---|---|"]
    for s in summary.values():
        desc = doc["descriptions"].get(s["state"], s["state"])
        save, psave = _pair(s["rows"], "save")
        load, pload = _pair(s["rows"], "load")
        lines.append(f"| {desc} | {s['fs']} | {save} | {psave} | {load} | {pload} |")
    return lines


def _bullets(doc: dict, summary: dict, policy: dict | None, results_dir: str) -> list[str]:
    out = []
    big = [s for s in summary.values() if s["fs"] == "disk" and "rss_frac" in
           s["rows"].get("unickpt", {})]
    if big:
        s = max(big, key=lambda s: s["bytes"])
        orbax = s["rows"].get("orbax Standard", {})
        extra = (f" (orbax: {_report._mib(orbax['rss_extra'])})" if "rss_extra" in orbax
                 else "")
        out.append(f"- Extra memory of a save of the {_report._mib(s['bytes'])} state: "
                   f"{_report._mib(s['rows']['unickpt']['rss_extra'])}{extra}; per state in "
                   "the full tables.")
    for s in summary.values():
        mm = s["rows"].get("unickpt (mmap)", {})
        if s["fs"] == "disk" and s["state"] == "big" and "load_best" in mm:
            out.append(f"- `unickpt.load(mmap=True)` opens the {_report._mib(s['bytes'])} "
                       f"state in {_ms(mm['load_best'])} (a lazy open, not a restore: no "
                       "array byte is read).")
    a = doc.get("async")
    if a:
        out.append(f"- An async save of the big state blocks for "
                   f"{_ms(statistics.median(a['blocking']))} (a plain copy of its arrays: "
                   f"{_ms(statistics.median(a['memcpy']))}; durable after "
                   f"{_ms(statistics.median(a['total']))}; medians).")
    st = doc.get("startup")
    if st:
        b = st["best"]
        ls = next(k for k in b if k.startswith("unickpt ls"))
        out.append(f"- Start-up, whole processes (best of {st['repeats']}): `import unickpt` "
                   f"{b['import unickpt']:.2f} s, `import numpy` {b['import numpy']:.2f} s "
                   f"({b['import unickpt'] / b['import numpy']:.2f}x); `{ls}` {b[ls]:.2f} s.")
    unstable = sorted({f"{k} {op}" for k, s in summary.items() for n, r in s["rows"].items()
                       for op in ("save", "load")
                       if n == _fastest(s["rows"], op) and not r.get(op + "_stable", True)})
    out.append("- Stable figures: every ratio above." if not unstable else
               "- Unstable ratios (`~`: the repeats disagree, a rerun may flip them): "
               + ", ".join(unstable) + ".")
    if policy:
        out.append(f"- With {policy['n']:,} checkpoints in a run root, the directory scan takes "
                   f"{_ms(policy['scan_s'])} and `checkpoints()` (which reads every manifest) "
                   f"{_ms(policy['checkpoints_s'])}; the start decision "
                   f"{_ms(policy['resolve_start_s'])} ([policy_scale.md]"
                   f"({results_dir}/policy_scale.md)).")
    return out


def _wrap(text: str, indent: str = "") -> list[str]:
    """Prose as the README writes it: lines of at most 95 characters."""
    return textwrap.wrap(text, 95, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def section(doc: dict, policy: dict | None = None, results_dir: str = "benchmarks/results"
            ) -> str:
    """The Performance section (heading included, ending with one blank line)."""
    summary = _report.summarize(doc)
    m = doc["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k != "unickpt")
    intro = ("`python benchmarks/run.py` times unickpt against torch.save, safetensors (numpy "
             "and torch), numpy.savez, orbax StandardCheckpointer and "
             "torch.distributed.checkpoint on the same states in one run: durable saves (the "
             "harness fsyncs what a peer leaves unsynced), materialized restores (from a cold "
             "page cache on the disk), systems alternating round-robin, each case on the disk "
             "and on tmpfs (the libraries' own cost, without the disk). Figures are best of "
             f"{_report.repeats_text(doc)}; ratios are unickpt's speed over the fastest "
             "peer's (> 1: unickpt faster). Method and fairness rules: "
             "[benchmarks/README.md](benchmarks/README.md); medians, spreads and every system: "
             f"[{results_dir}/results.md]({results_dir}/results.md).")
    run = (f"This run{' (QUICK: shrunk states)' if doc.get('quick') else ''}: "
             f"{m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']:.0f} GiB RAM, disk "
             f"{m['disk']}, Linux {m['kernel']}, Python {m['python']}; {versions}; load "
           f"average {m['load_at_start'][0]:.1f} at start, {m['load_at_end'][0]:.1f} at end.")
    lines = [HEADING, "", *_wrap(intro), "", *_wrap(run), "", *_table(doc, summary), ""]
    for b in _bullets(doc, summary, policy, results_dir):
        lines += _wrap(b, "  ")
    lines.append("")
    met = _report.targets(summary, doc.get("async"), doc)
    if met:
        lines += _wrap(f"Targets met: {sum(1 for *_, ok in met if ok)} of {len(met)}"
                       + ("" if all(ok for *_, ok in met) else "; not met: "
                          + "; ".join(f"{t} ({v})" for t, v, ok in met if not ok)) + ".")
        lines.append("")
    lines += [f"![unickpt against its peers]({results_dir}/results.png)", ""]
    return "\n".join(lines) + "\n"


def rewrite(readme: str, new_section: str) -> str:
    """``readme`` with its generated Performance text replaced: from the heading to the next
    ``## `` or ``### `` heading, so hand-written subsections after it stay as they are."""
    start = readme.find(HEADING + "\n")
    if start < 0:
        raise ValueError(f"no {HEADING!r} heading in the README")
    ends = [e for e in (readme.find(h, start + len(HEADING)) for h in ("\n## ", "\n### "))
            if e >= 0]
    rest = readme[min(ends) + 1:] if ends else ""
    return readme[:start] + new_section + rest


def update(readme_path: str, results_path: str, check: bool = False) -> bool:
    """Rewrite (or with ``check``, compare) the README; True when it already matched."""
    with open(results_path) as f:
        doc = json.load(f)
    pol_path = os.path.join(os.path.dirname(results_path), "policy_scale.json")
    policy = None
    if os.path.exists(pol_path):
        with open(pol_path) as f:
            policy = json.load(f)
    rel = os.path.relpath(os.path.dirname(os.path.abspath(results_path)),
                          os.path.dirname(os.path.abspath(readme_path)))
    with open(readme_path) as f:
        old = f.read()
    new = rewrite(old, section(doc, policy, rel.replace(os.sep, "/")))
    if new != old and not check:
        with open(readme_path, "w") as f:
            f.write(new)
    return new == old


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results", "results.json"))
    ap.add_argument("--readme", default=os.path.join(os.path.dirname(HERE), "README.md"))
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = ap.parse_args(argv)
    same = update(args.readme, args.results, args.check)
    print(f"{args.readme}: {'up to date' if same else 'stale' if args.check else 'rewritten'}")
    return 1 if args.check and not same else 0


if __name__ == "__main__":
    sys.exit(main())
