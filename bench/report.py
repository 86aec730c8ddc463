"""Results -> ratios, target checks, a Markdown table and a PNG chart."""
from __future__ import annotations

from pathlib import Path

SYSTEM_LABELS = {"mmserve": "mmserve (dynamic batching)", "nobatch": "mmserve (batching off)",
                 "litserve": "LitServe (peer)", "mmserve-before": "before: mmserve (dynamic batching)",
                 "nobatch-before": "before: mmserve (batching off)"}
TARGETS = {  # workload: (min fraction of the limit, min throughput vs peer) at concurrency 32, p99 no worse (issue 15)
    "demo": (0.95, 1.0),
    "tiny": (0.8, 2.0),
}
TARGET_CONCURRENCY = 32
SINGLE_CALLER_TARGET = 0.95  # at concurrency 1, dynamic batching / batching off (an idle model costs nothing)


def _point(result: dict, system: str, c: int) -> dict | None:
    for p in result.get("systems", {}).get(system, {}).get("points", []):
        if p["concurrency"] == c:
            return p
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(a / b, 3)


def add_ratios(result: dict) -> None:
    """Per concurrency: mmserve / limit, / batching-off, / peer (throughput) and p99 mmserve / peer."""
    limit = (result.get("limit") or {}).get("throughput")
    rows = []
    for c in result["concurrency"]:
        m, off, peer = (_point(result, s, c) for s in ("mmserve", "nobatch", "litserve"))
        mt = m["throughput"] if m else None
        rows.append({
            "concurrency": c,
            "mmserve_over_limit": _ratio(mt, limit),
            "mmserve_over_nobatch": _ratio(mt, off["throughput"] if off else None),
            "mmserve_over_peer": _ratio(mt, peer["throughput"] if peer else None),
            "p99_mmserve_over_peer": _ratio(m["p99_ms"] if m else None, peer["p99_ms"] if peer else None),
            "nobatch_over_limit": _ratio(off["throughput"] if off else None, limit),
            "peer_over_limit": _ratio(peer["throughput"] if peer else None, limit),
        })
    result["ratios"] = rows
    target = TARGETS.get(result["workload"])
    row = next((r for r in rows if r["concurrency"] == TARGET_CONCURRENCY), None)
    if target and row:
        lim_min, peer_min = target
        checks = {
            "concurrency": TARGET_CONCURRENCY,
            "limit_target": lim_min, "mmserve_over_limit": row["mmserve_over_limit"],
            "limit_ok": row["mmserve_over_limit"] is not None and row["mmserve_over_limit"] >= lim_min,
            "peer_target": peer_min, "mmserve_over_peer": row["mmserve_over_peer"],
            "peer_ok": row["mmserve_over_peer"] is not None and row["mmserve_over_peer"] >= peer_min,
            "p99_mmserve_over_peer": row["p99_mmserve_over_peer"],
            "p99_ok": row["p99_mmserve_over_peer"] is not None and row["p99_mmserve_over_peer"] <= 1.0,
        }
        one = next((r for r in rows if r["concurrency"] == 1), None)
        if one and one["mmserve_over_nobatch"] is not None:
            checks["c1_target"] = SINGLE_CALLER_TARGET
            checks["c1_mmserve_over_nobatch"] = one["mmserve_over_nobatch"]
            checks["c1_ok"] = one["mmserve_over_nobatch"] >= SINGLE_CALLER_TARGET
        checks["all_ok"] = bool(checks["limit_ok"] and checks["peer_ok"] and checks["p99_ok"]
                                and checks.get("c1_ok", True))
        result["targets"] = checks


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _runtime(meta: dict) -> str:
    return "TorchScript (torch)" if meta.get("backend") == "torchscript" else "onnxruntime"


def markdown(report: dict) -> str:
    meta = report["meta"]
    out = [f"# mmserve bench: {report['name']}", "",
           f"{meta['started']} · {meta['machine']} · device {meta['device']} · server cores {meta['server_cpus']} "
           f"({_runtime(meta)} intra-op threads {meta['threads']}), client cores {meta['client_cpus']} · "
           f"{meta['requests_note']}", ""] + ([meta["note"], ""] if meta.get("note") else [])
    for wl in report["workloads"]:
        lim = wl.get("limit") or {}
        out += [f"## {wl['workload']}: {wl['model']} ({wl['note']})", ""]
        if lim:
            per = ", ".join(f"b{b}: {v['throughput']:.0f}/s" for b, v in lim["per_batch_size"].items())
            out += [f"Limit (in-process decode + preprocess + inference, no HTTP): **{lim['throughput']:.1f} req/s** "
                    f"at batch {lim['best_batch_size']} ({per}).", ""]
        out += ["| system | conc. | req/s | p50 ms | p99 ms | mean batch | errors | RSS MB | server CPU % | "
                "server CPU ms/req | client CPU % |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for sysname, sysres in wl["systems"].items():
            if "error" in sysres:
                out.append(f"| {SYSTEM_LABELS.get(sysname, sysname)} | - | failed: {sysres['error'][:80]} | | | | | | | | |")
                continue
            for p in sysres["points"]:
                batch = p.get("mean_batch_size")
                if batch is None:
                    batch = p.get("mean_batch_size_header")
                out.append(f"| {SYSTEM_LABELS.get(sysname, sysname)} | {p['concurrency']} | {p['throughput']:.1f} | "
                           f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {_fmt(batch, '.2f')} | {p['errors']} | "
                           f"{_fmt(p.get('rss_mb_peak'), '.0f')} | {_fmt(p.get('server_cpu_pct'), '.0f')} | "
                           f"{_fmt(cpu_ms_per_request(p), '.2f')} | {_fmt(p.get('client_cpu_pct'), '.0f')} |")
        out += ["", "| conc. | mmserve/limit | mmserve/batching-off | mmserve/peer | p99 mmserve/peer |",
                "|---:|---:|---:|---:|---:|"]
        for r in wl.get("ratios", []):
            out.append(f"| {r['concurrency']} | {_fmt(r['mmserve_over_limit'], '.2f')} | "
                       f"{_fmt(r['mmserve_over_nobatch'], '.2f')} | {_fmt(r['mmserve_over_peer'], '.2f')} | "
                       f"{_fmt(r['p99_mmserve_over_peer'], '.2f')} |")
        t = wl.get("targets")
        if t:
            def mark(ok):
                return "met" if ok else "NOT met"
            out += ["", f"Targets at concurrency {t['concurrency']}: mmserve/limit {_fmt(t['mmserve_over_limit'], '.2f')} "
                    f"(target >= {t['limit_target']}: {mark(t['limit_ok'])}); mmserve/peer "
                    f"{_fmt(t['mmserve_over_peer'], '.2f')} (target >= {t['peer_target']}: {mark(t['peer_ok'])}); "
                    f"p99 mmserve/peer {_fmt(t['p99_mmserve_over_peer'], '.2f')} (target <= 1: {mark(t['p99_ok'])})"
                    + (f"; at concurrency 1, dynamic batching / batching off {_fmt(t['c1_mmserve_over_nobatch'], '.2f')} "
                       f"(target >= {t['c1_target']}: {mark(t['c1_ok'])})" if "c1_ok" in t else "") + "."]
        out.append("")
    if report.get("before"):
        out += compare_markdown(report["before"], report)
    for why in report.get("skipped", []):
        out += [f"Skipped: {why}", ""]
    out += [f"Chart: {report.get('chart', '-')}", ""]
    return "\n".join(out)


def cpu_ms_per_request(point: dict) -> float | None:
    """Server CPU per answered request (ms): measured as such, or from CPU % and throughput (older reports)."""
    if point.get("server_cpu_ms_per_req") is not None:
        return point["server_cpu_ms_per_req"]
    if point.get("server_cpu_pct") is None or not point.get("throughput"):
        return None
    return round(10 * point["server_cpu_pct"] / point["throughput"], 3)


def before_from_same_run(report: dict, label: str) -> dict:
    """A run served from an older checkout beside this one (`--before-root`): the report it would have made (its
    mmserve systems, the same limit and peer), for `compare_markdown`."""
    import copy

    out = {"name": label, "label": label, "meta": {"started": report["meta"]["started"] + " (same run)"},
           "workloads": []}
    for wl in report["workloads"]:
        old = copy.deepcopy({k: v for k, v in wl.items() if k not in ("systems", "ratios", "targets")})
        old["systems"] = {s: copy.deepcopy(wl["systems"][s + "-before"]) for s in ("mmserve", "nobatch")
                          if s + "-before" in wl["systems"]}
        if "litserve" in wl["systems"]:
            old["systems"]["litserve"] = copy.deepcopy(wl["systems"]["litserve"])
        add_ratios(old)
        out["workloads"].append(old)
    return out


def compare_markdown(before: dict, after: dict) -> list[str]:
    """Before / after on the same machine: per workload and concurrency, each system's req/s, p50, p99 and server
    CPU per request, and the limit (each run measures its own)."""
    label = before.get("label") or before.get("name", "before")
    started = before.get("meta", {}).get("started", "-")
    how = (f"In one run ({after['meta']['started']}): the before-systems were served from {label}, each right before "
           "the same system from this checkout, on the same cores with the same requests; the limit and LitServe are "
           "measured once and shared." if started.endswith("(same run)") else
           f"Before: {started} ({label}); after: {after['meta']['started']}. Same machine, same cores, same "
           "requests; the limit is measured anew in each run.")
    out = [f"## Before / after ({label} -> this run)", "", how, ""]
    olds = {w["workload"]: w for w in before.get("workloads", [])}
    for wl in after["workloads"]:
        old = olds.get(wl["workload"])
        if old is None:
            continue
        out += ["| workload | conc. | system | req/s before | req/s after | p50 ms before | p50 ms after | p99 ms before | "
                "p99 ms after | server CPU ms/req before | after |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lb, la = (old.get("limit") or {}).get("throughput"), (wl.get("limit") or {}).get("throughput")
        for c in wl["concurrency"]:
            if lb or la:
                out.append(f"| {wl['workload']} | {c} | limit (in-process) | {_fmt(lb)} | {_fmt(la)} | | | | | | |")
            for sysname in ("mmserve", "nobatch", "litserve"):
                b, a = _point(old, sysname, c), _point(wl, sysname, c)
                if not a and not b:
                    continue
                g = lambda p, k: p.get(k) if p else None  # noqa: E731
                out.append(f"| {wl['workload']} | {c} | {SYSTEM_LABELS[sysname]} | {_fmt(g(b, 'throughput'))} | "
                           f"{_fmt(g(a, 'throughput'))} | {_fmt(g(b, 'p50_ms'))} | {_fmt(g(a, 'p50_ms'))} | "
                           f"{_fmt(g(b, 'p99_ms'))} | {_fmt(g(a, 'p99_ms'))} | "
                           f"{_fmt(cpu_ms_per_request(b) if b else None, '.2f')} | "
                           f"{_fmt(cpu_ms_per_request(a) if a else None, '.2f')} |")
        rb = {r["concurrency"]: r for r in old.get("ratios", [])}
        ra = {r["concurrency"]: r for r in wl.get("ratios", [])}
        out += ["", f"{wl['workload']}: ratios before -> after", "",
                "| conc. | mmserve/limit | mmserve/batching-off | mmserve/peer | p99 mmserve/peer |", "|---:|---:|---:|---:|---:|"]
        for c in wl["concurrency"]:
            x, y = rb.get(c, {}), ra.get(c, {})
            out.append(f"| {c} | " + " | ".join(f"{_fmt(x.get(k), '.2f')} -> {_fmt(y.get(k), '.2f')}" for k in (
                "mmserve_over_limit", "mmserve_over_nobatch", "mmserve_over_peer", "p99_mmserve_over_peer")) + " |")
        out.append("")
    return out


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is missing (reports go without a
    chart then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def versions(backend: str = "onnx") -> dict:
    """The versions of what a serving measurement depends on (torch only where it serves: --backend torchscript)."""
    import platform

    out = {"python": platform.python_version()}
    for mod in ("onnxruntime", "litserve", "fastapi", "uvicorn", "aiohttp", "numpy") + (
            ("torch",) if backend == "torchscript" else ()):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def chart(report: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    wls = report["workloads"]
    if not wls:
        return None
    fig, axes = plt.subplots(len(wls), 2, figsize=(12, 4.2 * len(wls)), squeeze=False)
    colors = {"mmserve": "tab:blue", "nobatch": "tab:orange", "litserve": "tab:green",
              "mmserve-before": "tab:purple", "nobatch-before": "tab:brown"}
    for row, wl in zip(axes, wls):
        ax_t, ax_l = row
        for sysname, sysres in wl["systems"].items():
            pts = sysres.get("points") or []
            if not pts:
                continue
            cs = [p["concurrency"] for p in pts]
            label = SYSTEM_LABELS.get(sysname, sysname)
            col = colors.get(sysname)
            ax_t.plot(cs, [p["throughput"] for p in pts], "o-", color=col, label=label)
            ax_l.plot(cs, [p["p50_ms"] for p in pts], "o-", color=col, label=f"{label} p50")
            ax_l.plot(cs, [p["p99_ms"] for p in pts], "s--", color=col, label=f"{label} p99")
        lim = (wl.get("limit") or {}).get("throughput")
        if lim:
            ax_t.axhline(lim, color="black", ls=":", label=f"limit (in-process, batch {wl['limit']['best_batch_size']})")
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xticks(report["concurrency"])
            ax.set_xticklabels([str(c) for c in report["concurrency"]])
            ax.set_xlabel("concurrency")
            ax.grid(alpha=0.3)
        ax_t.set_ylabel("requests / s")
        ax_t.set_ylim(bottom=0)
        ax_t.set_title(f"{wl['workload']} ({wl['model']}): throughput")
        ax_l.set_yscale("log")
        ax_l.set_ylabel("latency ms")
        ax_l.set_title(f"{wl['workload']}: p50 / p99 latency")
        ax_t.legend(fontsize=8)
        ax_l.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def git_state() -> str:
    """The commit measured, and how many tracked files differed from it in the working tree."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                               timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (f" + {len(dirty)} modified tracked file(s) in the working tree" if dirty else "")
