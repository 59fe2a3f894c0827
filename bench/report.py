"""Reports: `<stem>.json` (everything measured), `<stem>.md` (tables and the ratios), `<stem>.png` (the plot).

The ratios to the official way are computed here from numbers measured in the same run, never
from numbers of another machine or another day. The plot needs matplotlib; without it the
report says so and the rest is written all the same.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from swssl.bench import machine as machine_info
from swssl.bench.bank_scaling import bank_scaling_markdown

FORMAT = "swssl-bench/1"
HOW = """\
- Timing: warm-up calls first, then repeated calls; every number is the median repetition (p95 beside it
  where it matters), wall-clock time with the device synchronised before and after each repetition.
- Encoder throughput: windows/s of one backend call on a batch of real foreground windows (cut from the
  training images) already on the device; host-to-device copies are not in it (they are end to end).
- End to end: `swssl.inference.runner.run_inference`, what `swssl-infer` runs: read each slice, resize it to the run's
  geometry, cut the windows on the device, skip background windows, encode, score against the memory bank
  (aligned scorer), write scores.csv/jsonl. One slide first as warm-up; model loading timed apart. Seconds
  per slide are the runner's own per-slide times; slides/s and windows/s are over the whole call.
- Native slide: the same runner on one large generated slide at scale 1 (native geometry, strips streamed
  from a memory-mapped .npy, global scorer), on the fastest end-to-end path (of each mode).
- Dense mode (paths named "... dense"; swssl/windows/dense.py): the trunk runs once over the slice and every window
  pools the feature cells it covers. Its "encoder" number is windows/s of embedding one whole slice
  already on the device (trunk pass, pooling and foreground test; every window of the grid, background
  included), so it compares with the exact paths' best batch. FLOPs per window = one trunk pass over the
  slice / its windows. End to end it is the same runner as exact mode, with the run's dense memory bank.
- The official way: what evaluate.py does, with the same encoder and weights: the resized slice as an 8-bit
  PIL image, each window cropped on the host and converted by ToTensor, one forward pass per window
  (batch 1) in a Python loop, features copied to the host. Timed on windows spread over its
  (H - P) // step grid; seconds per slide = that grid's window count / its windows/s (an extrapolation; the
  resize of each image is not counted, which favours the official way).
- Speed-ups ("x official") are ours / official in windows/s, and official / ours in seconds per slide.
  End-to-end speed-ups include the background skip (the official code encodes every window) and
  everything around the encoder (reading, resizing, scoring, writing results).
- The limit: FLOPs per window (torch.utils.flop_counter, multiply-add = 2) x windows/s over the matmul
  peak measured in this run for the path's precision (a large square torch.mm), in percent.
- Memory: peak resident set of the process during the step (Linux VmHWM, reset at the step's start) and
  torch's peak device allocation (ONNX Runtime's and TensorRT's own allocations are not in it).
- Weights: random and untrained; speed does not depend on the weights, so no training was needed and the
  numbers hold for a trained run of the same backbone."""


# --- numbers -----------------------------------------------------------------------------------


def best_encoder_rows(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per path, its encoder row at the batch size with the most windows/s."""
    best: dict[str, dict[str, Any]] = {}
    for row in entry.get("encoder", []):
        if row["path"] not in best or row["windows_per_s"] > best[row["path"]]["windows_per_s"]:
            best[row["path"]] = row
    return best


def ratio_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Per path: best encoder windows/s, end-to-end windows/s and seconds per slide, each with its speed-up
    over the official way measured in the same run (None where either side is missing)."""
    official = entry.get("official") or {}
    official_rate = official.get("windows_per_s")
    official_slide = official.get("seconds_per_slide_extrapolated")
    encoder = best_encoder_rows(entry)
    e2e = {row["path"]: row for row in entry.get("end_to_end", []) if row.get("slides")}
    rows = []
    for path in dict.fromkeys([*encoder, *e2e]):
        enc, end = encoder.get(path, {}), e2e.get(path, {})
        rows.append({
            "path": path,
            "encoder_windows_per_s": enc.get("windows_per_s"), "encoder_batch": enc.get("batch"),
            "encoder_speedup": _ratio(enc.get("windows_per_s"), official_rate),
            "percent_of_peak": enc.get("percent_of_peak"), "peak": enc.get("peak"),
            "e2e_windows_per_s": end.get("windows_per_s"),
            "e2e_windows_speedup": _ratio(end.get("windows_per_s"), official_rate),
            "seconds_per_slide": end.get("seconds_per_slide_median"),
            "seconds_per_slide_p95": end.get("seconds_per_slide_p95"),
            "slide_speedup": _ratio(official_slide, end.get("seconds_per_slide_median")),
        })
    return rows


def dense_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Per dense-mode path: its numbers beside those of the same backend and precision in exact mode."""
    rows = {row["path"]: row for row in ratio_rows(entry)}
    out = []
    for row in entry.get("encoder", []) + entry.get("end_to_end", []):
        if row.get("mode") != "dense" or any(r["path"] == row["path"] for r in out):
            continue
        dense, exact = rows.get(row["path"], {}), rows.get(row["path"].removesuffix(" dense"), {})
        out.append({**dense, "exact_path": exact.get("path"),
                    "exact_encoder_windows_per_s": exact.get("encoder_windows_per_s"),
                    "exact_seconds_per_slide": exact.get("seconds_per_slide"),
                    "encoder_vs_exact": _ratio(dense.get("encoder_windows_per_s"), exact.get("encoder_windows_per_s")),
                    "slide_vs_exact": _ratio(exact.get("seconds_per_slide"), dense.get("seconds_per_slide"))})
    return out


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours and theirs else None


def headline(result: dict[str, Any]) -> list[str]:
    """One paragraph per backbone: the official way, our fastest encoder path and our fastest end-to-end path."""
    lines = []
    for entry in result.get("models", []):
        official = entry.get("official") or {}
        rows = ratio_rows(entry)
        parts = [f"**{entry['backbone']}**"]
        if entry.get("flops_per_window"):
            parts[0] += f" ({_gflop(entry['flops_per_window'])} GFLOP per {entry['geometry']['patch']} px window)"
        if official:
            parts.append(f"the official way (batch 1, one window per call) {_rate(official['windows_per_s'])} windows/s, "
                         f"{_seconds(official['seconds_per_slide_extrapolated'])} per slice "
                         f"({official['grid_windows']} windows, extrapolated)")
        enc = max((r for r in rows if r["encoder_windows_per_s"]), key=lambda r: r["encoder_windows_per_s"], default=None)
        if enc:
            text = (f"fastest encoder: {enc['path']} {_rate(enc['encoder_windows_per_s'])} windows/s at batch "
                    f"{enc['encoder_batch']}")
            extras = [f"{_x(enc['encoder_speedup'])} the official way"] if enc["encoder_speedup"] else []
            if enc.get("percent_of_peak") is not None:
                extras.append(f"{enc['percent_of_peak']:.0f} % of the measured {enc['peak']} matmul peak")
            parts.append(text + (f" ({'; '.join(extras)})" if extras else ""))
        end = min((r for r in rows if r["seconds_per_slide"]), key=lambda r: r["seconds_per_slide"], default=None)
        if end:
            e2e = next(r for r in entry["end_to_end"] if r["path"] == end["path"])
            text = (f"fastest end to end: {end['path']} {_seconds(end['seconds_per_slide'])} per slice (median; p95 "
                    f"{_seconds(end['seconds_per_slide_p95'])}), {e2e['slides_per_s']:.2f} slides/s, "
                    f"{_rate(e2e['windows_per_s'])} windows/s, {100 * e2e['skipped_share']:.0f} % of windows skipped "
                    "as background")
            if end["slide_speedup"]:
                text += f": {_x(end['slide_speedup'])} faster per slice than the official way"
            parts.append(text)
        dense = dense_rows(entry)
        fastest = min((r for r in dense if r["seconds_per_slide"]), key=lambda r: r["seconds_per_slide"], default=None)
        if fastest:
            text = f"dense mode: {fastest['path']} {_seconds(fastest['seconds_per_slide'])} per slice end to end"
            ratios = [f"{_x(fastest[key])} {what}" for key, what in (("slide_vs_exact", "its exact-mode path"),
                                                                   ("slide_speedup", "the official way"))
                      if fastest[key]]
            parts.append(text + (f" ({', '.join(ratios)})" if ratios else ""))
        for key in ("native", "native_dense"):
            native = entry.get(key)
            if native and native.get("slides"):
                parts.append(f"a {native['shape'][0]} x {native['shape'][1]} native slide in "
                             f"{_seconds(native['wall_seconds'])} ({native['path']}, {_rate(native['windows_per_s'])} "
                             f"windows/s, {100 * native['skipped_share']:.0f} % background skipped)")
        lines.append(parts[0] + ": " + "; ".join(parts[1:]) + ".")
    return lines


# --- formatting --------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{1000 * value:.0f} ms"
    if value < 120:
        return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"
    return f"{int(value // 60)} min {value % 60:.0f} s"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x" if value < 100 else f"{value:,.0f}x"


def _flops(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e12:.3f} T" if value >= 1e12 else f"{value / 1e9:.1f} G"


def _gflop(flops: float) -> str:
    return f"{flops / 1e9:.2f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


# --- markdown ----------------------------------------------------------------------------------


def render_markdown(result: dict[str, Any], plot_name: str | None) -> str:
    """The report as Markdown: machine, headline, per backbone the ratio, encoder, end-to-end tables."""
    device = result.get("device", "cpu")
    out = [f"# swssl-bench: {device.upper() if device == 'cpu' else 'CUDA'}, {result.get('date')}", ""]
    if result.get("smoke"):
        out += ["**Smoke run** (tiny geometry and counts): checks the harness, its numbers mean nothing.", ""]
    out += [f"**Machine**: {machine_info.one_line(result['machine'])}.", ""]
    wall = result.get("wall_seconds")
    status = "" if result.get("finished") else " (**unfinished**: the run stopped before its end)"
    out += [f"**Command**: `{result.get('command') or 'swssl-bench'}`; started {result.get('started')}, "
            f"wall time {_seconds(wall)}{status}.", ""]
    images = result.get("images")
    if images:
        out += [f"**Slices**: {images['note']}; memory bank of {len(images['bank'])} normal images."]
    slide = result.get("large_slide")
    if slide:
        out += [f"**Large slide**: generated {slide['shape'][0]} x {slide['shape'][1]} 16-bit .npy, "
                f"{100 * slide['tissue_share']:.0f} % tissue, the rest empty background."]
    out += ["**Weights**: random (seeded), untrained: speed does not depend on the weights, so no training was "
            "needed; the numbers hold for a trained run of the same backbone.", ""]
    out += ["## Headline", ""] + [f"- {line}" for line in headline(result)] + [""]
    for entry in result.get("models", []):
        out += _model_section(entry, plot_name, result.get("plot_missing"))
    if result.get("bank_scaling"):
        out += ["## Bank search as the bank grows (the global scorer; synthetic embeddings)", ""]
        out += bank_scaling_markdown(result["bank_scaling"]) + [""]
    peaks = result.get("peaks", {})
    if peaks:
        out += ["## Matmul peak (measured in this run)", ""]
        names = list(dict.fromkeys(k for v in peaks.values() for k in v.get("kernels", {})))
        out += _table(["precision", "n x n x n", *[f"{k} FLOP/s" for k in names], "peak used"],
                      [[key, str(v["size"]), *[_flops(v.get("kernels", {}).get(k, {}).get("flops_per_s")) for k in names],
                        f"{_flops(v['flops_per_s'])} ({v.get('kernel', '-')})"] for key, v in peaks.items()])
        out += ["", "Percentages of peak above 100 mean the encoder's kernels do fewer multiplications than the nominal "
                "count (e.g. Winograd convolutions) or reach more than a plain GEMM does on this machine.", ""]
    out += _problems(result, "the run")
    out += ["## How it was measured", "", HOW, ""]
    return "\n".join(out)


def _model_section(entry: dict[str, Any], plot_name: str | None, plot_missing: str | None = None) -> list[str]:
    g = entry.get("geometry") or {}
    out = [f"## {entry['backbone']}", ""]
    facts = [f"weights {entry.get('weights')}"]
    if g:
        facts.append(f"slices resized to {g['height']} x {g['width']}, {g['patch']} px windows every {g['step']} px "
                     f"({g['grid']} grid)")
    if entry.get("dim"):
        facts.append(f"{entry['dim']}-d embeddings")
    if entry.get("flops_per_window"):
        facts.append(f"{_gflop(entry['flops_per_window'])} GFLOP per window")
    sentence = "; ".join(facts)
    out += [sentence[:1].upper() + sentence[1:] + ".", ""]
    rows = ratio_rows(entry)
    if rows:
        out += ["### Ratios to the official way (same run, same weights, same images)", ""]
        out += _table(["path", "encoder windows/s (batch)", "x official", "% of peak", "end-to-end windows/s",
                       "x official", "s/slice median (p95)", "x official per slice"],
                      [[r["path"], f"{_rate(r['encoder_windows_per_s'])} ({r['encoder_batch'] or '-'})",
                        _x(r["encoder_speedup"]),
                        "-" if r["percent_of_peak"] is None else f"{r['percent_of_peak']:.1f} ({r['peak']})",
                        _rate(r["e2e_windows_per_s"]), _x(r["e2e_windows_speedup"]),
                        f"{_seconds(r['seconds_per_slide'])} ({_seconds(r['seconds_per_slide_p95'])})",
                        _x(r["slide_speedup"])] for r in rows])
        out += [""]
    official = entry.get("official")
    if official:
        out += [f"The official way: {_rate(official['windows_per_s'])} windows/s (median of {official['windows_timed']} "
                f"single-window calls, p95 {_seconds(official['p95_s'])} per window); its grid is "
                f"{official['grid'][0]} x {official['grid'][1]} = {official['grid_windows']} windows per slice, so "
                f"{_seconds(official['seconds_per_slide_extrapolated'])} per slice (extrapolated); peak RSS "
                f"{_mib(official.get('peak_rss_mib'))} MiB.", ""]
    dense = dense_rows(entry)
    if dense:
        out += ["### Dense mode against exact mode (same backend and precision)", ""]
        out += _table(["path", "windows/s embedding a slice", "exact: best windows/s (batch)", "x exact",
                       "s/slice end to end", "exact s/slice", "x exact per slice", "x official per slice"],
                      [[r["path"], _rate(r.get("encoder_windows_per_s")),
                        f"{_rate(r['exact_encoder_windows_per_s'])} ({r['exact_path'] or '-'})",
                        _x(r["encoder_vs_exact"]), _seconds(r.get("seconds_per_slide")),
                        _seconds(r["exact_seconds_per_slide"]), _x(r["slide_vs_exact"]), _x(r.get("slide_speedup"))]
                       for r in dense])
        flops_dense = entry.get("dense_flops_per_window")
        if flops_dense and entry.get("flops_per_window"):
            out += ["", f"Dense mode costs {_gflop(flops_dense)} GFLOP per window (one trunk pass over the slice / its "
                        f"windows), {entry['flops_per_window'] / flops_dense:.1f}x less than a window on its own."]
        out += [""]
    encoder = [row for row in entry.get("encoder", []) if row.get("mode", "exact") == "exact"]
    if encoder:
        batches = sorted({row["batch"] for row in encoder})
        by_path: dict[str, dict[int, dict[str, Any]]] = {}
        for row in encoder:
            by_path.setdefault(row["path"], {})[row["batch"]] = row
        out += ["### Encoder throughput (windows/s, median)", ""]
        out += _table(["path", *[f"batch {b}" for b in batches], "peak RSS MiB", "peak device MiB"],
                      [[path, *[_rate(cells[b]["windows_per_s"]) if b in cells else "-" for b in batches],
                        _mib(max((c.get("peak_rss_mib") or 0) for c in cells.values()) or None),
                        _mib(max((c.get("peak_device_mib") or 0) for c in cells.values()) or None)]
                       for path, cells in by_path.items()])
        out += [""]
        if plot_name:
            out += [f"![windows/s against batch size]({plot_name})", ""]
        elif plot_missing:
            out += [f"(No plot: {plot_missing}.)", ""]
    e2e = [row for row in entry.get("end_to_end", [])]
    if e2e:
        out += ["### End to end: the runner on DBT-sized slices", ""]
        out += _table(["path", "batch", "slides", "slides/s", "s/slice median", "p95", "windows/s", "background skipped",
                       "model load s", "peak RSS MiB", "peak device MiB"],
                      [[r["path"], _batch(r), str(r.get("slides", 0)),
                        f"{r['slides_per_s']:.2f}" if r.get("slides") else "-",
                        _seconds(r.get("seconds_per_slide_median")), _seconds(r.get("seconds_per_slide_p95")),
                        _rate(r.get("windows_per_s")),
                        f"{100 * r['skipped_share']:.1f} %" if r.get("slides") else "-",
                        f"{r['load_seconds']:.1f}", _mib(r.get("peak_rss_mib")), _mib(r.get("peak_device_mib"))]
                       for r in e2e])
        out += [""] + [f"Note ({r['path']}): {r['note']}." for r in e2e if r.get("note")]
        out += [""] if any(r.get("note") for r in e2e) else []
        out += _stage_table(e2e)
    for native in (entry.get("native"), entry.get("native_dense")):
        if not (native and native.get("slides")):
            continue
        out += [f"### Native slide (streamed, scale 1, {native.get('mode', 'exact')} mode)", "",
                f"{native['shape'][0]} x {native['shape'][1]} px on {native['path']}: {_seconds(native['wall_seconds'])} "
                f"(runner's own time {_seconds(native['seconds_per_slide_median'])}), grid {native['grid'][0]} x "
                f"{native['grid'][1]}, {native['windows_scored']:,} windows encoded and {native['windows_skipped']:,} "
                f"skipped as background ({100 * native['skipped_share']:.0f} %), {_rate(native['windows_per_s'])} "
                f"windows/s; peak RSS {_mib(native.get('peak_rss_mib'))} MiB"
                + (f", peak device {_mib(native['peak_device_mib'])} MiB" if native.get("peak_device_mib") else "")
                + ".", ""]
    setup = [f"run directory {entry['setup_seconds']['checkpoint']:.1f} s, memory bank "
             f"({entry.get('bank_images')} images) {entry['setup_seconds']['bank']:.1f} s"] if entry.get("setup_seconds") else []
    setup += [f"{e['artifact']} {e['precision']} {e.get('mode', 'exact')} export (verified"
              + (f", batch profile {e['batch_profile']['min']},{e['batch_profile']['opt']},{e['batch_profile']['max']}"
                 if e.get("batch_profile") else "") + f") {e['seconds']:.1f} s" for e in entry.get("exports", [])]
    if setup:
        out += ["Setup (not in any number above): " + "; ".join(setup) + ".", ""]
    out += _problems(entry, entry["backbone"])
    return out


def _batch(row: dict[str, Any]) -> str:
    if row.get("batch_how") == "dense":
        return "-"
    return f"{row.get('batch')}{' (probed)' if row.get('batch_how') == 'probed' else ''}"


STAGE_ORDER = ("read", "resize", "wait", "upload", "windows", "embed", "score", "write", "other")


def _stage_table(e2e: list[dict[str, Any]]) -> list[str]:
    """Where a slice's time goes, per path (swssl.profiling's stages, ms per slice and the encoder's share)."""
    rows = [r for r in e2e if r.get("stages", {}).get("frames")]
    if not rows:
        return []
    names = [n for n in STAGE_ORDER if any(n in r["stages"]["stages"] for r in rows)]
    out = ["Where a slice's time goes (ms per slice, exclusive wall time per stage: `swssl-infer --profile`; "
           "windows = cutting, foreground tests and pooling; other = statistics and bookkeeping):", ""]
    out += _table(["path", *names, "encoder share"],
                  [[r["path"], *[f"{r['stages']['stages'][n]['ms_per_frame']:.1f}" if n in r["stages"]["stages"]
                                 else "-" for n in names],
                    f"{100 * (r['stages']['stages'].get('embed', {}).get('share') or 0):.0f} %"] for r in rows])
    return out + [""]


def _problems(where: dict[str, Any], name: str) -> list[str]:
    out = []
    if where.get("skipped"):
        out += [f"Skipped in {name}: " + "; ".join(f"{s['what']} ({s['why']})" for s in where["skipped"]) + ".", ""]
    if where.get("errors"):
        out += [f"**Errors in {name}**:", ""] + [f"- {e['step']}: {e['error']}" for e in where["errors"]] + [""]
    return out


# --- plot --------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> str | None:
    """windows/s against batch size, one line per path, one panel per backbone, the official way dashed.
    Returns None when written, else why not."""
    models = [m for m in result.get("models", []) if m.get("encoder")]
    if not models:
        return "no encoder measurements"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed"
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.6), squeeze=False)
    for ax, entry in zip(axes[0], models):
        by_path: dict[str, list[tuple[int, float]]] = {}
        exact = [row for row in entry["encoder"] if row.get("mode", "exact") == "exact"]
        for row in exact:
            by_path.setdefault(row["path"], []).append((row["batch"], row["windows_per_s"]))
        for label, points in by_path.items():
            points.sort()
            ax.plot([b for b, _ in points], [w for _, w in points], marker="o", label=label)
        official = entry.get("official")
        if official:
            ax.axhline(official["windows_per_s"], color="black", linestyle="--", linewidth=1,
                       label=f"official way (batch 1 loop): {_rate(official['windows_per_s'])}")
        ax.set_xscale("log", base=2)
        for row in entry["encoder"]:
            if row.get("mode") == "dense":  # one slice per call: a level, not a curve over batch sizes
                ax.axhline(row["windows_per_s"], linestyle=":", linewidth=1.5,
                           label=f"{row['path']} (whole slice): {_rate(row['windows_per_s'])}")
        batches = sorted({row["batch"] for row in exact})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("batch size (windows per call)")
        ax.set_ylabel("windows/s (median)")
        ax.set_title(f"{entry['backbone']}, {entry.get('geometry', {}).get('patch', '?')} px windows")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    info = result["machine"]
    where = info["gpu"]["name"] if info.get("gpu") else f"{info['cpu']}, {info['cores']} cores"
    fig.suptitle(f"swssl encoder throughput, {where}, torch {info['versions'].get('torch')}, {result.get('date')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(result: dict[str, Any], out: Path, stem: str, draw: bool = True) -> list[Path]:
    """`out/<stem>.json`, `.md` and, when `draw` and it can be drawn, `.png`; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for entry in result.get("models", []):
        entry["ratios"] = ratio_rows(entry)
    result["headline"] = headline(result)
    png = out / f"{stem}.png"
    if draw:
        why_not = plot(result, png)
        result["plot"] = png.name if why_not is None else None
        result["plot_missing"] = why_not
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths[1].write_text(render_markdown(result, result.get("plot")))
    return paths + ([png] if result.get("plot") else [])
