"""Summaries of a benchmark run: machine description, JSON, a markdown table and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from typing import Any

NOT_PEERS = ("unickpt", "unickpt (mmap)")  # and every "raw ..." reference


def _mount_of(path: str) -> tuple[str, str]:
    best = ("?", "?", "")
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fs = line.split()[:3]
            if path.startswith(mnt.rstrip("/") + "/") or path == mnt:
                if len(mnt) >= len(best[2]):
                    best = (dev, fs, mnt)
    return best[0], best[1]


def machine_info(workdir: str, systems: list) -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       "?")
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    dev, fs = _mount_of(workdir)
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu, "ram_gib": ram,
            "disk": f"{dev} ({fs})", "kernel": platform.release(),
            "python": sys.version.split()[0],
            "versions": {s.name: s.version for s in systems}}


# A figure is "stable" when the repeats agree: max/min of its times within STABLE_SPREAD; a
# ratio is stable when both sides are and its best-of-N and median versions agree (same side
# of 1.0 and within 15% of each other).  Ratios that fail this can flip between runs.
STABLE_SPREAD = 1.3


def repeats_text(doc: dict) -> str:
    """How many repeats a figure is the best (and median) of, as the reports say it."""
    n, fast = doc["repeats"], doc.get("fast_repeats", doc["repeats"])
    if fast <= n:
        return f"{n}"
    return (f"{n} ({fast} for the systems whose save + restore of a state take under "
            f"{doc.get('fast_s', 1.0):g} s: short operations are the ones noise swings most)")


def _is_raw(name: str) -> bool:
    return name.startswith("raw")


def _key(st: dict) -> str:
    return st["state"] if st.get("fs", "disk") == "disk" else f"{st['state']} ({st['fs']})"


def summarize(doc: dict) -> dict:
    """Best, median, spread, GB/s and ratios per state, filesystem and system."""
    out = {}
    for st in doc["states"]:
        size = st["bytes"]
        rows = {}
        for name, r in st["runs"].items():
            row: dict[str, Any] = {}
            for op in ("save", "load"):
                if r[op]:
                    row[op] = statistics.median(r[op])
                    row[op + "_best"] = best = min(r[op])
                    row[op + "_spread"] = max(r[op]) / best if best > 0 else 1.0
                    row[op + "_gbs"] = size / 1e9 / best if best > 0 else float("inf")
            if r["rss"]:
                row["rss_extra"] = max(r["rss"])
                row["rss_frac"] = max(r["rss"]) / size
            if r["load_rss"]:
                row["load_rss_extra"] = max(r["load_rss"])
            rows[name] = row
        u = rows.get("unickpt", {})
        for name, row in rows.items():
            for op in ("save", "load"):
                if op in row and op in u and name != "unickpt (mmap)":
                    med = row[op] / u[op]  # unickpt speed / this system's speed
                    best = row[op + "_best"] / u[op + "_best"]
                    row[op + "_ratio"] = med
                    row[op + "_ratio_best"] = best
                    row[op + "_stable"] = (
                        max(row[op + "_spread"], u[op + "_spread"]) <= STABLE_SPREAD
                        and (med - 1) * (best - 1) >= 0
                        and max(med, best) / min(med, best) <= 1.15)
        out[_key(st)] = {"state": st["state"], "fs": st.get("fs", "disk"), "bytes": size,
                         "narrays": st["narrays"], "cold_cache": st["cold_cache"],
                         "cache_note": st.get("cache_note", ""), "rows": rows}
    return out


def _bound_fraction(doc: dict, summary: dict, fs: str) -> tuple[float, str] | None:
    """(best write bound time / unickpt best save time of the big state, bound method)."""
    wb = (doc.get("write_bound") or {}).get(fs)
    key = "big" if fs == "disk" else f"big ({fs})"
    u = summary.get(key, {}).get("rows", {}).get("unickpt")
    if not wb or not u or summary[key]["bytes"] != wb["bytes"]:
        return None
    return wb["best_s"] / u["save_best"], wb["best_method"]


def targets(summary: dict, async_res: dict | None,
            doc: dict | None = None) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target; judged on best-of-N (median in brackets)."""
    res: list[tuple[str, str, bool | None]] = []

    def ratio(rows: dict, peer: str, op: str) -> tuple[float, str]:
        r = rows[peer]
        note = "" if r.get(op + "_stable") else ", unstable"
        return r[op + "_ratio_best"], (f"{r[op + '_ratio_best']:.2f}x "
                                       f"(median {r[op + '_ratio']:.2f}x{note}; {peer})")

    for state, s in summary.items():
        rows = s["rows"]
        u = rows.get("unickpt")
        peers = {k: v for k, v in rows.items() if k not in NOT_PEERS and not _is_raw(k)
                 and "save" in v}
        if not u or not peers:
            continue
        if s["state"] in ("big", "transformer"):
            for op, what in (("save", "durable save"), ("load", "materialized restore")):
                fastest = min(peers, key=lambda k: peers[k][op + "_best"])
                r, txt = ratio(rows, fastest, op)
                res.append((f"{state}: {what} >= 1.0x fastest peer", txt, r >= 1.0))
        if s["state"] == "small":
            if "orbax Standard" in rows:
                for op, what in (("save", "save"), ("load", "restore")):
                    r, txt = ratio(rows, "orbax Standard", op)
                    res.append((f"{state}: {what} >= 10x faster than orbax", txt, r >= 10))
            st = [k for k in rows if k.startswith("safetensors")]
            for op, what in (("save", "save"), ("load", "restore")):
                if st:
                    best = min(st, key=lambda k: rows[k][op + "_best"])
                    r, txt = ratio(rows, best, op)
                    res.append((f"{state}: {what} >= 1.0x safetensors", txt, r >= 1.0))
    if doc is not None:
        for fs in (doc.get("write_bound") or {}):
            bf = _bound_fraction(doc, summary, fs)
            if bf:
                res.append((f"big ({fs}): durable save as a fraction of the machine's best "
                            "write of the same bytes (>= 0.8)",
                            f"{bf[0]:.2f} (bound: {bf[1]})", bf[0] >= 0.8))
    # The RSS target is about big states; for the few-MB small-array state the fixed cost of
    # 10,000 manifest entries (Python objects) is reported in its table, not judged here.
    fr = [(k, v["rows"]["unickpt"]["rss_frac"]) for k, v in summary.items()
          if "rss_frac" in v["rows"].get("unickpt", {}) and v["bytes"] >= (64 << 20)]
    if fr:
        worst = max(fr, key=lambda x: x[1])
        res.append(("peak extra RSS while saving <= 10% of state (states >= 64 MiB)",
                    f"{worst[1] * 100:.1f}% (worst: {worst[0]})", worst[1] <= 0.10))
    if async_res:
        r = statistics.median(async_res["blocking"]) / statistics.median(async_res["memcpy"])
        res.append(("async save blocking <= 1.5x memcpy of the state", f"{r:.2f}x", r <= 1.5))
    if doc is not None and doc.get("startup"):
        res += [tuple(t) for t in doc["startup"]["targets"]]
    return res


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 0.1 else f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < (10 << 20) else f"{n / 2**20:.0f} MiB"


def _cell(r: dict, op: str) -> str:
    """best | median | spread | ratio best (median), '~' marking an unstable ratio."""
    if op not in r:
        return "- | - | - | - | "
    ratio = "-"
    if r.get("self"):
        ratio = "1.00x"
    elif op + "_ratio" in r:
        ratio = (f"{r[op + '_ratio_best']:.2f}x ({r[op + '_ratio']:.2f}x)"
                 + ("" if r[op + "_stable"] else " ~"))
    return (f"{_fmt_s(r[op + '_best'])} | {_fmt_s(r[op])} | {r[op + '_spread']:.2f}x | "
            f"{ratio} | ")


def _memory_lines(summary: dict) -> list[str]:
    """The save's extra memory per state size: honest for small states too."""
    out = []
    for key, s in summary.items():
        u = s["rows"].get("unickpt", {})
        if "rss_extra" in u and s["fs"] == "disk":
            out.append(f"{key} ({_mib(s['bytes'])}, {s['narrays']} arrays): "
                       f"+{_mib(u['rss_extra'])} ({u['rss_frac'] * 100:.0f}%)")
    if not out:
        return []
    return ["Extra memory of a unickpt save (peak RSS over the baseline), per state: "
            + "; ".join(out) + ". It is near zero for large states (arrays are streamed from "
            "their own memory), but not for states of many small arrays: the manifest entries "
            "and batching buffers cost a few MiB regardless of the state's size, which is "
            "several times a state of a few MiB.", ""]


def markdown(doc: dict, summary: dict) -> str:
    m = doc["machine"]
    lines = [f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']:.0f} GiB RAM, "
             f"disk {m['disk']}, Linux {m['kernel']}, Python {m['python']}; load average "
             f"{m['load_at_start'][0]:.2f} at start, {m['load_at_end'][0]:.2f} at end. "
             f"Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
             "",
             f"Best and median of {repeats_text(doc)} round-robin repeats"
             f"{' (QUICK: tiny states)' if doc['quick'] else ''}; spread = slowest / fastest "
             "repeat. Saves are durable: the harness fsyncs the files and directories of "
             + ", ".join(k for k, v in doc["fsync_added"].items() if v)
             + " (they do not all fsync themselves). Ratio = unickpt speed / system speed "
             "(> 1: unickpt faster), by best-of-N (by median in brackets); `~` marks an "
             f"unstable ratio (a spread over {STABLE_SPREAD}x on either side, or best and median "
             "disagreeing by more than 15% or on which side of 1.0 they fall): such a ratio can "
             "flip between runs. Every state runs on the disk and on tmpfs (`/dev/shm`): the "
             "tmpfs figures are the libraries' own costs, without the disk. `unickpt (mmap)` is "
             "a lazy open (file-backed views, nothing read yet), not a restore. RSS = peak "
             "extra resident memory during the save.", ""]
    for state, s in summary.items():
        cache = s["cache_note"] or ("cold page cache" if s["cold_cache"] else "WARM page cache")
        desc = doc["descriptions"].get(s["state"], "")
        if doc["quick"]:
            desc = f"quick, shrunk version of: {desc}"
        lines += [f"### {state}: {desc} "
                  f"({_mib(s['bytes'])}, {s['narrays']} arrays; restores from {cache})",
                  "",
                  "| system | save best | median | spread | unickpt / it | "
                  "restore best | median | spread | unickpt / it | GB/s save / restore | "
                  "save extra RSS |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in s["rows"].items():
            rss = (f"{_mib(r['rss_extra'])} ({r['rss_frac'] * 100:.0f}%)"
                   if "rss_extra" in r else "-")
            gbs = " / ".join(f"{r[op + '_gbs']:.2f}" if op in r else "-"
                             for op in ("save", "load"))
            label = name + (" (lazy open)" if name == "unickpt (mmap)" else "")
            r = dict(r, self=name == "unickpt")
            lines.append(f"| {label} | {_cell(r, 'save')}{_cell(r, 'load')}{gbs} | {rss} |")
        unstable = [n for n, r in s["rows"].items() for op in ("save", "load")
                    if op + "_stable" in r and not r[op + "_stable"] and n != "unickpt"]
        lines += ["", "Stable ratios: all." if not unstable else
                  "Unstable ratios (`~`): " + ", ".join(sorted(set(unstable))) + ".", ""]
    wb = doc.get("write_bound") or {}
    for fs, b in wb.items():
        bf = _bound_fraction(doc, summary, fs)
        lines += [f"### write bound ({fs}): the machine's best durable write of "
                  f"{b['bytes'] / 2**20:.0f} MiB", "",
                  "| method | best | median | GB/s (best) |", "|---|---:|---:|---:|"]
        for meth, ts in b["times"].items():
            lines.append(f"| {meth} | {_fmt_s(min(ts))} | {_fmt_s(statistics.median(ts))} | "
                         f"{b['bytes'] / 1e9 / min(ts):.2f} |")
        if bf:
            lines += ["", f"unickpt's durable save of the big state reaches **{bf[0]:.2f}** of "
                      f"this bound ({bf[1]}, best-of-N both)."]
        lines.append("")
    lines += _memory_lines(summary)
    if doc.get("async"):
        a = doc["async"]
        lines += ["### async save (big state)", "",
                  f"plain copy of every array: {_fmt_s(statistics.median(a['memcpy']))}; "
                  f"`CheckpointManager(async_save=True).save()` blocked "
                  f"{_fmt_s(statistics.median(a['blocking']))}; durable after "
                  f"{_fmt_s(statistics.median(a['total']))} (medians).", ""]
    if doc.get("startup"):
        import startup

        lines.append(startup.markdown(doc["startup"]))
    lines += ["### targets (judged on best-of-N)", "", "| target | measured | met |",
              "|---|---|---|"]
    for t, v, ok in targets(summary, doc.get("async"), doc):
        lines.append(f"| {t} | {v} | {'yes' if ok else 'NO'} |")
    if doc["missing"]:
        lines += ["", "Not measured (not importable): " + ", ".join(doc["missing"])]
    return "\n".join(lines) + "\n"


def chart(doc: dict, summary: dict, path: str) -> None:
    """Best-of-N per system on the disk; lazy mmap opens are kept out of the restore bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = [k for k, v in summary.items() if v["fs"] == "disk"] or list(summary)
    if not states:
        return
    fig, axes = plt.subplots(2, len(states), figsize=(5.2 * len(states), 7.5), squeeze=False)
    for c, state in enumerate(states):
        rows = summary[state]["rows"]
        for r, op in enumerate(("save", "load")):
            ax = axes[r][c]
            names = [n for n in rows if op in rows[n] and n != "unickpt (mmap)"]
            title = f"{state}: {'durable save' if op == 'save' else 'materialized restore'}"
            if op == "load" and "load" in rows.get("unickpt (mmap)", {}):
                # a lazy open reads nothing: it is not a restore and is not drawn as one
                title += (f"\n(unickpt lazy mmap open, not a restore: "
                          f"{_fmt_s(rows['unickpt (mmap)']['load_best'])})")
            if summary[state]["narrays"] >= 1000:  # many tiny arrays: seconds, not GB/s
                vals = [rows[n][op + "_best"] for n in names]
                ax.set_xlabel("seconds, best of N (lower is better, log)")
                ax.set_xscale("log")
            else:
                vals = [rows[n][op + "_gbs"] for n in names]
                ax.set_xlabel("GB/s, best of N (higher is better)")
            wb = (doc.get("write_bound") or {}).get("disk")
            if op == "save" and wb and wb["bytes"] == summary[state]["bytes"]:
                names.append(f"write bound ({wb['best_method']})")  # the machine's best write
                vals.append(wb["best_gbs"])
            colors = ["tab:red" if n.startswith("unickpt") else
                      "tab:gray" if _is_raw(n) or n.startswith("write bound") else "tab:blue"
                      for n in names]
            ax.barh(names, vals, color=colors)
            ax.invert_yaxis()
            ax.set_title(title, fontsize=10)
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    m = doc["machine"]
    n, fast = doc["repeats"], doc.get("fast_repeats", doc["repeats"])
    fig.suptitle(f"unickpt vs peers: {m['cpu_count']} CPUs, {m['ram_gib']:.0f} GiB RAM, "
                 f"{m['disk']}; best of {n if fast <= n else f'{n}-{fast}'} "
                 "(tables: medians and spread too)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_all(doc: dict, out: str) -> None:
    summary = summarize(doc)
    doc = dict(doc, summary=summary,
               targets=[{"target": t, "measured": v, "met": ok}
                        for t, v, ok in targets(summary, doc.get("async"), doc)])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(doc, summary))
    chart(doc, summary, os.path.join(out, "results.png"))
