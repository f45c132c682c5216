"""Turning group results into results.md, results.json and one PNG per group."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from ._env import render
from ._harness import GroupResult, Row, human_size, human_time

__all__ = ["markdown", "write_all", "headline_table"]


def _fmt(value: float, unit: str) -> str:
    if unit == "ns":
        return f"{value:,.0f} ns" if value >= 100 else f"{value:.1f} ns"
    return human_time(value)


def _cell(r: Row) -> str:
    if r.error:
        return f"failed: {r.error}"
    st = r.stats
    if st is None:
        return "-"
    return f"{_fmt(st.median, r.unit)} [{_fmt(st.q1, r.unit)}-{_fmt(st.q3, r.unit)}]"


def _gbps(r: Row) -> str:
    st = r.stats
    if st is None or r.size is None or st.median <= 0:
        return ""
    return f"{r.size / st.median / 1e9:.2f} GB/s"


def _methods(res: GroupResult) -> list[str]:
    seen: dict[str, None] = {}
    for r in res.rows:
        seen.setdefault(r.method, None)
    return list(seen)


def _ratio_txt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _sized_tables(res: GroupResult, ref: str) -> list[str]:
    sizes = sorted({r.size for r in res.rows if r.size is not None})
    methods = _methods(res)
    head = "| method | " + " | ".join(human_size(s) for s in sizes) + " |"
    sep = "|---" * (len(sizes) + 1) + "|"
    out = ["Median [IQR] per handoff:", "", head, sep]
    for m in methods:
        cells = []
        for s in sizes:
            r = next((x for x in res.rows if x.method == m and x.size == s), None)
            cells.append("" if r is None else _cell(r))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", f"Ratio: method's median / {ref}'s median (same run; > 1 means {ref} is faster):", "",
            head, sep]
    for m in methods:
        cells = []
        for s in sizes:
            mine, base = res.median(m, s), res.median(ref, s)
            cells.append(_ratio_txt(None if mine is None or base is None or base == 0 else mine / base))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    if res.throughput:
        out += ["", "Throughput (size / median):", "", head, sep]
        for m in methods:
            cells = []
            for s in sizes:
                r = next((x for x in res.rows if x.method == m and x.size == s), None)
                cells.append("" if r is None else _gbps(r))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def _variant_table(res: GroupResult, ref: str) -> list[str]:
    variants = list(dict.fromkeys(r.variant for r in res.rows))
    methods = _methods(res)
    kr = any("kernel_released" in r.extra for r in res.rows)
    head = "| method | " + ("kernel-released | " if kr else "")
    head += " | ".join(f"{v} median [IQR] | {v} ratio" for v in variants) + " | n |"
    out = [head, "|---" * (1 + kr + 2 * len(variants) + 1) + "|"]
    for m in methods:
        rows = [next((x for x in res.rows if x.method == m and x.variant == v), None) for v in variants]
        cells = []
        if kr:
            flag = next((r.extra.get("kernel_released") for r in rows if r is not None), None)
            cells.append({True: "yes", False: "no", None: "-"}[flag])
        ns = []
        for v, r in zip(variants, rows):
            if r is None:
                cells += ["", ""]
                continue
            cells.append(_cell(r))
            vref = next((x.method for x in res.rows
                         if x.variant == v and x.role == "shmarray" and x.samples), ref)
            mine, base = res.median(m, variant=v), res.median(vref, variant=v)
            cells.append(_ratio_txt(None if mine is None or base is None or base == 0 else mine / base))
            ns.append(str(len(r.samples)))
        cells.append("/".join(ns))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "Ratio: method's median / the median of the first shmarray row of that column, same run."]
    return out


def reference(res: GroupResult) -> str:
    """The row every ratio of a group is computed against: the first shmarray row."""
    for r in res.rows:
        if r.role == "shmarray" and r.samples:
            return r.method
    for r in res.rows:
        if r.samples:
            return r.method
    return res.rows[0].method if res.rows else ""


def headline_table(groups: list[GroupResult]) -> list[str]:
    """The aims, the ratios measured in this run, and whether each was met."""
    out = ["| aim | measured | target | met | detail |", "|---|---|---|---|---|"]
    for g in groups:
        for h in g.headlines:
            met = {True: "yes", False: "**no**", None: "-"}[h["ok"]]
            unit = h.get("unit", "x")
            value = _ratio_txt(h["ratio"]) if unit == "x" or h["ratio"] is None else f"{h['ratio']:.2f} {unit}"
            out.append(f"| {h['aim']} | {value} | {h['target']} | {met} | {h['detail']} |")
    return out


def markdown(env: dict[str, Any], groups: list[GroupResult]) -> str:
    """The whole results.md."""
    out = ["# shmarray benchmark results", "", render(env), "",
           "Every figure is the median over repeats with its interquartile range [q1-q3]; "
           "methods were measured round-robin, and every ratio comes from this run.", "",
           "## Headline", ""]
    out += headline_table(groups)
    for g in groups:
        out += ["", f"## {g.name}: {g.title}", ""]
        if g.rows:
            ref = reference(g)
            sized = any(r.size is not None for r in g.rows)
            out += _sized_tables(g, ref) if sized else _variant_table(g, ref)
        for note in g.notes:
            out += ["", note]
        for s in g.skipped:
            out += ["", f"Skipped: {s}"]
        extra_min_max = [r for r in g.rows if r.stats is not None]
        if extra_min_max:
            out += ["", "<details><summary>min-max and repeats</summary>", "",
                    "| method | size/variant | min | max | n |", "|---|---|---|---|---|"]
            for r in extra_min_max:
                st = r.stats
                assert st is not None
                where = human_size(r.size) if r.size is not None else r.variant
                lo, hi = _fmt(st.min, r.unit), _fmt(st.max, r.unit)
                out.append(f"| {r.method} | {where} | {lo} | {hi} | {st.n} |")
            out += ["", "</details>"]
        out += ["", f"![{g.name}]({g.name}.png)" if g.rows else "", "",
                f"_{g.name} took {g.seconds:.1f} s._"]
    return "\n".join(out) + "\n"


def _jsonable(g: GroupResult) -> dict[str, Any]:
    d = {"name": g.name, "title": g.title, "skipped": g.skipped, "notes": g.notes,
         "headlines": g.headlines, "seconds": round(g.seconds, 2), "rows": []}
    for r in g.rows:
        row = {k: v for k, v in dataclasses.asdict(r).items() if k != "samples"}
        row["samples"] = [float(f"{x:.6g}") for x in r.samples]
        st = r.stats
        row["stats"] = (None if st is None
                        else {k: float(f"{v:.6g}") for k, v in dataclasses.asdict(st).items()})
        d["rows"].append(row)
    return d


def plot(g: GroupResult, path: str) -> bool:
    """Draw *g* to *path* (PNG); False when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in g.rows if r.stats is not None]
    if not rows:
        return False
    if any(r.size is not None for r in rows):
        fig = _plot_sized(plt, g, rows)
    else:
        fig = _plot_bars(plt, g, rows)
    fig.savefig(path)
    plt.close(fig)
    return True


def _title(g: GroupResult) -> str:
    return g.title if g.title.lower().startswith(g.name) else f"{g.name}: {g.title}"


_STYLE = {"shmarray": {"linewidth": 2.6, "marker": "o"}, "floor": {"linestyle": "--", "marker": "."},
          "peer": {"marker": "s"}}


def _plot_sized(plt: Any, g: GroupResult, rows: list[Row]) -> Any:
    """One line per method against size, log axes, IQR as error bars."""
    longest = max((len(m) for m in _methods(g)), default=0)
    fig, ax = plt.subplots(figsize=(7.5 + 0.065 * longest, 5.5), dpi=100)
    for m in _methods(g):
        pts = sorted((r.size, r.stats) for r in rows if r.method == m and r.size is not None)
        if not pts:
            continue
        xs = [p[0] for p in pts]
        if g.throughput:
            ys = [s / st.median / 1e9 for s, st in pts]
            lo = [y - s / st.q3 / 1e9 for y, (s, st) in zip(ys, pts)]
            hi = [s / st.q1 / 1e9 - y for y, (s, st) in zip(ys, pts)]
        else:
            ys = [st.median * 1e6 for _, st in pts]
            lo = [y - st.q1 * 1e6 for y, (_, st) in zip(ys, pts)]
            hi = [st.q3 * 1e6 - y for y, (_, st) in zip(ys, pts)]
        role = next(r.role for r in rows if r.method == m)
        ax.errorbar(xs, ys, yerr=[lo, hi], label=m, capsize=2, **_STYLE.get(role, _STYLE["peer"]))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({r.size for r in rows if r.size is not None})
    ax.set_xticks(sizes)
    ax.set_xticklabels([human_size(s) for s in sizes], rotation=30)
    ax.set_xlabel("array size")
    ax.set_ylabel("GB/s (size / median time), higher is better" if g.throughput
                  else "median time (us), lower is better")
    ax.set_title(_title(g), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def _plot_bars(plt: Any, g: GroupResult, rows: list[Row]) -> Any:
    """One panel per variant: a horizontal bar per method (median, IQR whiskers, value printed)."""
    variants = list(dict.fromkeys(r.variant for r in rows))
    methods = _methods(g)
    height = max(3.0, 0.42 * len(methods) + 1.6)
    fig, axes = plt.subplots(1, len(variants), figsize=(6.0 * len(variants) + 3.5, height), dpi=100,
                             sharey=True, squeeze=False)
    for ax, v in zip(axes[0], variants):
        vals, errs, colors, labels = [], [[], []], [], []
        for m in methods:
            r = next((x for x in rows if x.method == m and x.variant == v), None)
            labels.append(m)
            if r is None or r.stats is None:
                vals.append(0.0)
                errs[0].append(0.0)
                errs[1].append(0.0)
                colors.append("white")
                continue
            st = r.stats
            scale = 1.0 if r.unit == "ns" else 1e3
            vals.append(st.median * scale)
            errs[0].append((st.median - st.q1) * scale)
            errs[1].append((st.q3 - st.median) * scale)
            kr = r.extra.get("kernel_released")
            colors.append("tab:red" if r.role == "shmarray" else "tab:gray" if r.role == "floor"
                          else "tab:orange" if kr is False else "tab:blue")
        ypos = list(range(len(labels)))[::-1]
        ax.barh(ypos, vals, xerr=errs, color=colors, capsize=2)
        shown = [x for x in vals if x > 0]
        if shown and max(shown) / min(shown) > 20:
            ax.set_xscale("log")
        unit = rows[0].unit
        for y, x, up in zip(ypos, vals, errs[1]):
            if x > 0:  # the value, printed past the whisker
                ax.text(x + up, y, f"  {x:,.0f}" if x >= 100 else f"  {x:.3g}", va="center", fontsize=7)
        ax.set_yticks(ypos)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlabel(("ns per operation" if unit == "ns" else "median time (ms)") + ", lower is better")
        ax.set_title(v, fontsize=9)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.margins(x=0.15)
    if g.name == "lock":
        from matplotlib.patches import Patch

        axes[0][-1].legend(handles=[Patch(color="tab:red", label="shmarray (kernel-released)"),
                                    Patch(color="tab:blue", label="kernel-released"),
                                    Patch(color="tab:orange", label="stays taken if its holder dies"),
                                    Patch(color="tab:gray", label="floor")], fontsize=7, loc="lower right")
    fig.suptitle(_title(g), fontsize=10)
    fig.tight_layout()
    return fig


def write_all(out_dir: str, env: dict[str, Any], groups: list[GroupResult]) -> list[str]:
    """Write results.md, results.json and the plots; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for g in groups:
        p = os.path.join(out_dir, f"{g.name}.png")
        if plot(g, p):
            written.append(p)
    md = os.path.join(out_dir, "results.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown(env, groups))
    written.append(md)
    js = os.path.join(out_dir, "results.json")
    with open(js, "w", encoding="utf-8") as f:
        json.dump({"env": env, "groups": [_jsonable(g) for g in groups]}, f, indent=1, allow_nan=False,
                  default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
        f.write("\n")
    written.append(js)
    return written

