"""Summaries of a benchmark run: machine description, JSON, a markdown table and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from typing import Any

NOT_PEERS = ("unickpt", "unickpt (mmap)", "raw write+fsync")


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


def summarize(doc: dict) -> dict:
    """Medians, GB/s and ratios per state and system."""
    out = {}
    for st in doc["states"]:
        size = st["bytes"]
        rows = {}
        for name, r in st["runs"].items():
            row: dict[str, Any] = {}
            for op in ("save", "load"):
                if r[op]:
                    med = statistics.median(r[op])
                    row[op] = med
                    row[op + "_gbs"] = size / 1e9 / med if med > 0 else float("inf")
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
                    row[op + "_ratio"] = row[op] / u[op]  # unickpt speed / this system's speed
        out[st["state"]] = {"bytes": size, "narrays": st["narrays"],
                            "cold_cache": st["cold_cache"],
                            "cache_note": st.get("cache_note", ""), "rows": rows}
    return out


def targets(summary: dict, async_res: dict | None) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each of the issue's targets."""
    res: list[tuple[str, str, bool | None]] = []
    for state in ("big", "transformer"):
        if state not in summary:
            continue
        rows = summary[state]["rows"]
        u = rows.get("unickpt")
        peers = {k: v for k, v in rows.items() if k not in NOT_PEERS and "save" in v}
        if not u or not peers:
            continue
        fastest = min(peers, key=lambda k: peers[k]["save"])
        r = peers[fastest]["save"] / u["save"]
        res.append((f"{state}: durable save >= 1.0x fastest peer",
                    f"{r:.2f}x ({fastest})", r >= 1.0))
        if "raw write+fsync" in rows:
            r = rows["raw write+fsync"]["save"] / u["save"]
            res.append((f"{state}: durable save >= 0.8x raw write+fsync", f"{r:.2f}x", r >= 0.8))
        fastest = min(peers, key=lambda k: peers[k]["load"])
        r = peers[fastest]["load"] / u["load"]
        res.append((f"{state}: materialized restore >= 1.0x fastest peer",
                    f"{r:.2f}x ({fastest})", r >= 1.0))
    if "small" in summary:
        rows = summary["small"]["rows"]
        u = rows.get("unickpt")
        if u and "orbax Standard" in rows:
            r = rows["orbax Standard"]["save"] / u["save"]
            res.append(("small: save >= 10x faster than orbax", f"{r:.1f}x", r >= 10))
            r = rows["orbax Standard"]["load"] / u["load"]
            res.append(("small: restore >= 10x faster than orbax", f"{r:.1f}x", r >= 10))
        st = [k for k in rows if k.startswith("safetensors")]
        if u and st:
            best = min(st, key=lambda k: rows[k]["save"])
            r = rows[best]["save"] / u["save"]
            res.append(("small: save >= safetensors", f"{r:.2f}x ({best})", r >= 1.0))
            best = min(st, key=lambda k: rows[k]["load"])
            r = rows[best]["load"] / u["load"]
            res.append(("small: restore >= safetensors", f"{r:.2f}x ({best})", r >= 1.0))
    # The RSS target is about big states; for the few-MB small-array state the fixed cost of
    # 10,000 manifest entries (Python objects) is reported in its table, not judged here.
    fr = [(s, v["rows"]["unickpt"]["rss_frac"]) for s, v in summary.items()
          if "rss_frac" in v["rows"].get("unickpt", {}) and v["bytes"] >= (64 << 20)]
    if fr:
        worst = max(fr, key=lambda x: x[1])
        res.append(("peak extra RSS while saving <= 10% of state (states >= 64 MiB)",
                    f"{worst[1] * 100:.1f}% (worst: {worst[0]})", worst[1] <= 0.10))
    if async_res:
        r = statistics.median(async_res["blocking"]) / statistics.median(async_res["memcpy"])
        res.append(("async save blocking <= 1.5x memcpy of the state", f"{r:.2f}x", r <= 1.5))
    return res


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def markdown(doc: dict, summary: dict) -> str:
    m = doc["machine"]
    lines = [f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']:.0f} GiB RAM, "
             f"disk {m['disk']}, Linux {m['kernel']}, Python {m['python']}; load average "
             f"{m['load_at_start'][0]:.2f} at start, {m['load_at_end'][0]:.2f} at end. "
             f"Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
             "",
             f"Medians of {doc['repeats']} round-robin repeats{' (QUICK: tiny states)' if doc['quick'] else ''}. "
             "Saves are durable: the harness fsyncs the files and directories of "
             + ", ".join(k for k, v in doc["fsync_added"].items() if v)
             + " (they do not all fsync themselves). Ratio = unickpt speed / system speed "
             "(> 1: unickpt faster). RSS = peak extra resident memory during the save.", ""]
    for state, s in summary.items():
        cache = s["cache_note"] or ("cold page cache" if s["cold_cache"] else "WARM page cache")
        lines += [f"### {state}: {doc['descriptions'].get(state, '')} "
                  f"({s['bytes'] / 2**20:.0f} MiB, {s['narrays']} arrays; restores from {cache})",
                  "",
                  "| system | save | save GB/s | unickpt / it | restore | restore GB/s | "
                  "unickpt / it | save extra RSS |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in s["rows"].items():
            rss = (f"{r['rss_extra'] / 2**20:.0f} MiB ({r['rss_frac'] * 100:.0f}%)"
                   if "rss_extra" in r else "-")
            lines.append(
                f"| {name} | {_fmt_s(r.get('save'))} | "
                f"{r['save_gbs']:.2f} | " if "save" in r else f"| {name} | - | - | ")
            lines[-1] += (f"{r['save_ratio']:.2f}x | " if "save_ratio" in r else "- | ")
            ratio = f"{r['load_ratio']:.2f}x" if "load_ratio" in r else "-"
            lines[-1] += f"{_fmt_s(r.get('load'))} | {r['load_gbs']:.2f} | {ratio} | {rss} |"
        lines.append("")
    if doc.get("async"):
        a = doc["async"]
        lines += ["### async save (big state)", "",
                  f"plain copy of every array: {_fmt_s(statistics.median(a['memcpy']))}; "
                  f"`CheckpointManager(async_save=True).save()` blocked "
                  f"{_fmt_s(statistics.median(a['blocking']))}; durable after "
                  f"{_fmt_s(statistics.median(a['total']))}.", ""]
    lines += ["### targets", "", "| target | measured | met |", "|---|---|---|"]
    for t, v, ok in targets(summary, doc.get("async")):
        lines.append(f"| {t} | {v} | {'yes' if ok else 'NO'} |")
    if doc["missing"]:
        lines += ["", "Not measured (not importable): " + ", ".join(doc["missing"])]
    return "\n".join(lines) + "\n"


def chart(doc: dict, summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = list(summary)
    fig, axes = plt.subplots(2, len(states), figsize=(5.2 * len(states), 7.5), squeeze=False)
    for c, state in enumerate(states):
        rows = summary[state]["rows"]
        for r, op in enumerate(("save", "load")):
            ax = axes[r][c]
            names = [n for n in rows if op in rows[n]]
            title = f"{state}: {'durable save' if op == 'save' else 'restore'}"
            if state != "small" and "unickpt (mmap)" in names:
                # a zero-copy open (hundreds of GB/s) would flatten every other bar
                names.remove("unickpt (mmap)")
                title += f"\n(unickpt mmap open: {_fmt_s(rows['unickpt (mmap)'][op])}, not shown)"
            if state == "small":  # throughput means little for tiny arrays: show seconds
                vals = [rows[n][op] for n in names]
                ax.set_xlabel("seconds (lower is better, log)")
                ax.set_xscale("log")
            else:
                vals = [rows[n][op + "_gbs"] for n in names]
                ax.set_xlabel("GB/s (higher is better)")
            colors = ["tab:red" if n.startswith("unickpt") else
                      "tab:gray" if n.startswith("raw") else "tab:blue" for n in names]
            ax.barh(names, vals, color=colors)
            ax.invert_yaxis()
            ax.set_title(title, fontsize=10)
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    m = doc["machine"]
    fig.suptitle(f"unickpt vs peers: {m['cpu_count']} CPUs, {m['ram_gib']:.0f} GiB RAM, "
                 f"{m['disk']}; medians of {doc['repeats']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_all(doc: dict, out: str) -> None:
    summary = summarize(doc)
    doc = dict(doc, summary=summary,
               targets=[{"target": t, "measured": v, "met": ok}
                        for t, v, ok in targets(summary, doc.get("async"))])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(doc, summary))
    chart(doc, summary, os.path.join(out, "results.png"))
