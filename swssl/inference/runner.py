"""The tiling runner behind `swssl-infer`: score many slides of any size against a saved memory bank.

A slide is a 2-D image or one frame of a multi-frame file (a DBT volume: every frame is scored;
the volume's score is the max over its frames and the frame that gave it is reported).

Two geometries (the run's `geometry.inference` decides, `--scale` forces "native"):
- "resize": the run's own: the frame is resized to the training size exactly as swssl-eval does
  (`datasets.resize_frame`, read in bands of rows: the frame is never held whole), embedded with
  through the same loop as swssl-eval (`tiling.ImageWindows`), so the scores equal swssl-eval's.
- "native": windows cut from the full-resolution grid (times `--scale` = 1/k), streamed strip by
  strip with bounded memory (`swssl.windows.stream`); per-window scoring (`global`).

Outputs in OUT_DIR (one writer at a time: a lock refuses a second run at once), each slide's
written as soon as it is done: `scores.jsonl` and `scores.csv` (swssl.inference.results: statuses ok, empty,
error; any file name stored losslessly) get one line each; with heatmaps,
`heatmaps/<name>.png` (overlay) and `.npy` (the R x C float32 window-score map, NaN = background),
written atomically; `index.html` (swssl.inference.gallery) is rewritten at the end, also after an error or
Ctrl-C. The jsonl starts each invocation with a "run" record (configuration, backend, scorer).
A result that cannot be written stops the run with an OutputError (the rows before it intact); a
heatmap or gallery that cannot be written is listed in the summary and makes the exit status 2.
Names reach the terminal escaped (swssl.names).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from tqdm import tqdm

from swssl import profiling
from swssl.data import readers
from swssl.config import Config
from swssl.data.datasets import resize_frame
from swssl.errors import ConfigError, ImageReadError, OutputError, SwsslError
from swssl.files import FolderLock
from swssl.inference.batch_probe import choose_batch
from swssl.inference.gallery import write_gallery
from swssl.inference.heatmaps import Overlay, heatmap_name, write_heatmap
from swssl.names import for_terminal, one_line, readable
from swssl.scoring.report import MAX_OVERLAY_SIDE, score_line
from swssl.inference.results import HEATMAPS, SCORES_CSV, VOLUME, ResultLog, read_results
from swssl.inference.run import OpenRun
from swssl.scoring.calibration import Decision, resolve_threshold
from swssl.scoring.domain import FrameStats
from swssl.scoring.scorers import Scorer, build_scorer
from swssl.inference.slides import find_slides
from swssl.windows.stream import SlideStream, scale_factor
from swssl.windows.tiling import Chunk, ImageScore, ImageWindows, WindowSource, score_source


# --- results ---------------------------------------------------------------------------------


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, ImageReadError):
        return one_line(exc.reason)
    if isinstance(exc, SwsslError):
        return one_line(str(exc))
    return one_line(f"{type(exc).__name__}: {exc}")


# --- scoring one frame -------------------------------------------------------------------------


@dataclass
class Settings:
    geometry: str  # "resize" or "native"
    scale: float
    scorer_name: str
    scorer_options: dict[str, Any]
    batch_size: int | None = None  # windows per encoder call; None: probed when the run starts (`with_batch`)
    heatmaps: bool = False
    prefetch: int = 2
    max_pixels: int | None = readers.DEFAULT_MAX_PIXELS  # per frame; larger files are refused at open
    threshold: str | None = None  # a --threshold rule (swssl.scoring.calibration); None: the default
    dicom: bool = False  # a DICOM Parametric Map of the scores per DICOM input (swssl.inference.dicom_out)


STATS_SIDE = 256  # px: the thumbnail of a streamed frame that its intensity statistics are taken from


SLIDE_BAR_DELAY = 3.0  # s: a frame that takes longer gets a bar of its own (its windows done, an ETA)
REPORT_EVERY = 0.5  # s between progress reports within a frame (each costs a device-to-host sync)


class _Reporting:
    """A window source that reports (windows done, the grid's total) as its chunks are scored. Done counts the
    grid positions up to the last window embedded, background ones included: the total is known up front (the
    grid) but the foreground is not, so this count reaches the total and paces an honest ETA. Reports come at
    the start, at most every `every` seconds, and at the end."""

    def __init__(self, source: WindowSource, report: Callable[[int, int], None], every: float = REPORT_EVERY):
        self.source, self.report, self.every, self.grid = source, report, every, source.grid

    @property
    def foreground(self):
        return self.source.foreground

    def chunks(self, encode, every_window: bool) -> Iterator[Chunk]:
        rows, cols = self.grid.shape
        self.report(0, rows * cols)
        last = time.perf_counter()
        with contextlib.closing(self.source.chunks(encode, every_window)) as chunks:
            for chunk in chunks:
                yield chunk  # resumed once the scorers have taken it
                if len(chunk.rows) and time.perf_counter() - last >= self.every:
                    self.report(int(chunk.rows[-1] * cols + chunk.cols[-1]) + 1, rows * cols)
                    last = time.perf_counter()
        self.report(rows * cols, rows * cols)


@contextlib.contextmanager
def _frame_bar(slides_bar: Any, label: str) -> Iterator[Callable[[int, int], None]]:
    """A `score_frame` progress callback: a bar below the slides bar, windows done of the frame's total with
    their rate and an ETA, that appears only once the frame has taken SLIDE_BAR_DELAY seconds (a large slide)
    and goes when it is done; none when the slides bar is disabled (--quiet)."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit="window", unit_scale=True, leave=False, delay=SLIDE_BAR_DELAY,
                       disable=getattr(slides_bar, "disable", False), dynamic_ncols=True)
        bar.update(max(0, done - bar.n))

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def score_frame(reader: readers.ImageReader, frame: int, model: OpenRun, scorer: Scorer, settings: Settings,
                progress: Callable[[int, int], None] | None = None) -> tuple[ImageScore, Overlay | None, FrameStats]:
    """Score one frame in the settings' geometry; with heatmaps, also what its overlay is drawn on; and the
    frame's statistics for the domain check. `progress(done, total)`: windows done (`_Reporting`)."""
    config, backend = model.config, model.backend

    def reporting(source: WindowSource) -> WindowSource:
        return source if progress is None else _Reporting(source, progress)

    if settings.geometry == "resize":
        g = config.geometry
        image = resize_frame(reader, frame, g.height, g.width)  # = datasets.load_resized
        height, width = reader.shape
        source = ImageWindows(image, config, settings.batch_size, backend.device, (height / g.height, width / g.width))
        result = score_source(reporting(source), backend, {settings.scorer_name: scorer})[settings.scorer_name]
        return (result, Overlay(image, 1) if settings.heatmaps else None,
                FrameStats.of(reader.shape, reader.bit_depth, image))
    stream = SlideStream(reader, frame, config, scale=settings.scale, device=backend.device,
                         prefetch=settings.prefetch, batch_size=settings.batch_size,
                         thumbnail_side=MAX_OVERLAY_SIDE if settings.heatmaps else STATS_SIDE)
    result = score_source(reporting(stream), backend, {settings.scorer_name: scorer})[settings.scorer_name]
    return (result, Overlay(stream.thumbnail, stream.thumbnail_factor) if settings.heatmaps else None,
            FrameStats.of(reader.shape, reader.bit_depth, stream.thumbnail))


# --- the run -----------------------------------------------------------------------------------


@dataclass
class RunSummary:
    out_dir: Path
    gallery: Path | None = None
    scored: int = 0  # frames scored by this invocation
    empty: int = 0  # frames without foreground (status empty, no score)
    resumed: int = 0  # files whose results were already complete (--resume)
    windows: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (path, frame, message)
    unwritten: list[tuple[str, str]] = field(default_factory=list)  # (output file, why): heatmaps, gallery

    def merge(self, other: RunSummary) -> None:
        """Add another summary's counts and lists (a worker's, for one file) to this one's."""
        for name in ("scored", "empty", "resumed", "windows", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures += other.failures
        self.unwritten += other.unwritten

    @property
    def windows_per_second(self) -> float:
        return self.windows / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_status(self) -> int:
        """2 when an output could not be written, 1 when an input failed, else 0 (the errors.py convention)."""
        return 2 if self.unwritten else 1 if self.failures else 0


def choose_settings(config: Config, scorer: str | None, scorer_options: dict[str, dict] | None,
                    scale: float | None, batch_size: int | None, heatmaps: bool, prefetch: int = 2,
                    max_pixels: int | None = readers.DEFAULT_MAX_PIXELS, threshold: str | None = None,
                    dicom: bool = False) -> Settings:
    """The geometry (run config, or native when `scale` is given), the scorer (default: aligned for
    resize, global for native) and its options."""

    geometry = "native" if scale is not None else config.geometry.inference
    scale = 1.0 if scale is None else 1.0 / scale_factor(scale)
    name = scorer or ("global" if geometry == "native" else "aligned")
    options = (scorer_options or {}).get(name, {})
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch must be at least 1, not {batch_size}")
    if max_pixels is not None and max_pixels < 1:
        raise ConfigError(f"--max-pixels must be at least 1, not {max_pixels}")
    return Settings(geometry, scale, name, dict(options), batch_size, heatmaps, prefetch, max_pixels, threshold, dicom)


def run_inference(slides: Sequence[str | Path], model: OpenRun, out_dir: str | Path, settings: Settings,
                  resume: bool = False, progress: bool = True,
                  echo: Callable[[str], None] | None = None, exclude: Sequence[str] = ()) -> RunSummary:
    """Score every slide; see the module docstring for what is written where and when. `exclude`: globs of
    files that folders and globs do not contribute (slides.find_slides)."""
    out_dir = Path(out_dir)
    files, problems = slides_to_score(slides, out_dir, exclude)
    scorer = build_scorer(settings.scorer_name, model.bank, model.backend.device, **settings.scorer_options)
    summary, say = RunSummary(out_dir), sayer(echo)
    with FolderLock(out_dir, "swssl-infer"):  # probing the batch waits for the lock: a second run is refused at once
        settings, batch = with_batch(settings, model)
        decision, header = run_header(model, settings, resume, batch)
        common = common_fields(header, settings)
        with open_results(out_dir, header, resume, summary, say) as log:
            record_error = error_recorder(log, common, summary, say)
            for argument, message in problems:
                record_error(argument, None, message)
            bar = tqdm(files, desc="slides", unit="slide", disable=not progress, dynamic_ncols=True)
            for path in bar:
                score_path(path, model, scorer, settings, log, summary, bar, common, record_error, decision, say)
            bar.close()
    return summary


def with_batch(settings: Settings, model: OpenRun) -> tuple[Settings, str]:
    """`settings` with its encoder batch (--batch as given, else probed on the model's backend and device:
    swssl.inference.batch_probe), and how it was chosen."""
    g = model.config.geometry
    choice = choose_batch(settings.batch_size, model.backend, g.mode, g.patch, model.backend.device)
    return dataclasses.replace(settings, batch_size=choice.batch), choice.describe()


def slides_to_score(slides: Sequence[str | Path], out_dir: Path,
                    exclude: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """find_slides, refusing a command line that names nothing."""
    files, problems = find_slides(slides, out_dir=out_dir, exclude=exclude)
    if not files and not problems:
        raise ConfigError("no slides given")
    return files, problems


def sayer(echo: Callable[[str], None] | None) -> Callable[[str], None]:
    """say(text): a line for the terminal (escaped), above the progress bars unless `echo` is given."""
    print_line = echo or (lambda text: tqdm.write(text, file=sys.stderr))
    return lambda text: print_line(for_terminal(text))


@contextlib.contextmanager
def open_results(out_dir: Path, header: dict[str, Any], resume: bool, summary: RunSummary,
                 say: Callable[[str], None]) -> Iterator[ResultLog]:
    """The result log (the caller holds the lock), after saying the backend and threshold; at the end, also
    after an error or Ctrl-C, the csv and gallery (finish_outputs), unless the results cannot be written."""
    log = ResultLog(out_dir, header, resume)
    if header["backend_reason"]:
        say(f"backend: {header['backend_reason']}")
    if header["batch"]:
        say(f"batch: {header['batch']}")
    say(f"threshold: {header['calibration']}")
    writable = True
    try:
        yield log
    except OutputError:  # the results cannot be written: stop, and say so once
        writable = False
        raise
    finally:
        log.close()
        if writable:
            finish_outputs(log, out_dir, header, summary, say)


def run_header(model: OpenRun, settings: Settings, resume: bool, batch: str = "") -> tuple[Decision, dict[str, Any]]:
    """The threshold decision of the run's bank and the "run" record that starts each invocation's results
    (`batch`: how the encoder batch was chosen)."""
    backend = model.backend
    calibration = model.bank.calibration(settings.scorer_name, settings.scorer_options)
    decision = Decision(calibration, resolve_threshold(settings.threshold, calibration), model.bank.domain)
    header = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": str(model.source),
              "run_dir": str(model.run_dir), "backend": getattr(backend, "name", type(backend).__name__),
              "device": str(backend.device), "precision": getattr(backend, "precision", None),
              "backend_reason": getattr(backend, "reason", ""), "encoder_digest": model.digest, "scorer": settings.scorer_name,
              "scorer_options": settings.scorer_options, "geometry": settings.geometry,
              "mode": model.config.geometry.mode, "scale": settings.scale, "batch_size": settings.batch_size, "batch": batch, "resumed": bool(resume),
              "threshold": None if decision.threshold is None else decision.threshold.to_dict(),
              "calibration": decision.describe(), "config": model.config.to_dict()}
    return decision, header


def common_fields(header: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """What every row repeats of how it was scored (from the header of the process that scored it)."""
    return {"backend": header["backend"], "device": header["device"], "scorer": settings.scorer_name,
            "geometry": settings.geometry, "mode": header["mode"], "scale": settings.scale}


def error_recorder(log: ResultLog, common: dict[str, Any], summary: RunSummary,
                   say: Callable[[str], None]) -> Callable[..., None]:
    """record_error(path, frame, message, **extra): an error row written, said and listed in the summary."""
    def record_error(path: str, frame: Any, message: str, **extra: Any) -> None:
        log.write({"path": path, "frame": frame, "score": None, "status": "error", "message": message,
                   **common, **extra})
        shown = frame not in (None, "", VOLUME) and extra.get("frames", 1) > 1
        say(f"error: {path}{f' frame {frame}' if shown else ''}: {message}")
        summary.failures.append((path, str(frame) if shown else "", message))

    return record_error


def score_path(path: Path, model: OpenRun, scorer: Scorer, settings: Settings, log: ResultLog, summary: RunSummary,
               bar: Any, common: dict[str, Any], record_error: Callable[..., None], decision: Decision,
               say: Callable[[str], None]) -> None:
    """Open one file and score its frames not in `log.finished`; a file that cannot be opened is an error row."""
    key = str(path)
    try:
        reader = readers.open_image(path, model.config.preprocess.intensity, max_pixels=settings.max_pixels)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        record_error(key, None, _error_message(exc))
        return
    with reader:
        _score_file(key, reader, model, scorer, settings, log, summary, bar, common, record_error, decision, say)


def finish_outputs(log: ResultLog, out_dir: Path, header: dict[str, Any], summary: RunSummary,
                   say: Callable[[str], None]) -> None:
    """The csv with one row per result, and the gallery; what cannot be written is said and listed."""
    for path, write in ((out_dir / SCORES_CSV, log.rewrite_csv),
                        (out_dir / "index.html", lambda: write_gallery(out_dir, read_results(out_dir), header))):
        try:
            write()
        except Exception as exc:  # the appended results are safe; say why this file is not
            message = _error_message(exc)
            say(f"error: {message}")
            summary.unwritten.append((str(path), message))
        else:
            if path.name == "index.html":
                summary.gallery = path


def _score_file(key: str, reader: readers.ImageReader, model: OpenRun, scorer: Scorer, settings: Settings,
                log: ResultLog, summary: RunSummary, bar: Any, common: dict[str, Any], record_error,
                decision: Decision, say: Callable[[str], None]) -> None:
    frames = reader.frames
    finished = log.finished
    todo = [f for f in range(frames) if (key, str(f)) not in finished]
    volume_due = frames > 1 and (key, VOLUME) not in finished
    if not todo and not volume_due:
        summary.resumed += 1
        return
    done = {f: finished[(key, str(f))] for f in range(frames) if (key, str(f)) in finished}
    name = for_terminal(Path(key).name)
    scores: dict[int, ImageScore] = {}  # this run's results, for the DICOM map of the whole file
    dicom: dict[str, str] = {}
    for frame in todo:
        with profiling.stage(profiling.FRAME):
            started = time.perf_counter()
            label = name if frames == 1 else f"{name} [{frame + 1}/{frames}]"
            bar.set_postfix_str(label, refresh=True)
            try:
                with _frame_bar(bar, label) as progress:
                    result, overlay, stats = score_frame(reader, frame, model, scorer, settings, progress)
                if result.scored and not math.isfinite(result.score):
                    raise SwsslError(f"non-finite score {result.score} (the model or the memory bank gives NaN/inf)")
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                record_error(key, frame, _error_message(exc), frames=frames)
                continue
            seconds = time.perf_counter() - started
            record = {"path": key, "frame": frame, "score": float(result.score), "windows_scored": result.scored,
                      "windows_skipped": result.skipped, "seconds": round(seconds, 3), "status": "ok",
                      "message": "", "frames": frames, "shape": list(reader.shape), "grid": list(result.windows.shape),
                      "top_window": result.top_window(tuple(reader.shape)), **decision.judge(result.score, stats), **common}
            if record["warning"]:
                say(f"warning: {key}{f' frame {frame}' if frames > 1 else ''}: {record['warning']}")
            if not result.scored:  # nothing to compare: a score here would read as "most normal"
                threshold = model.config.preprocess.foreground_threshold
                record.update(score=None, status="empty", top_window=None, percentile=None, anomalous=None,
                              message=f"no foreground: no window has a pixel above preprocess.foreground_threshold "
                                      f"= {threshold:g} (blank or all-background image); not scored")
                summary.empty += 1
            elif settings.heatmaps:
                with profiling.stage("write"):
                    _add_heatmap(record, result, overlay, key, frame, frames, log.out_dir, summary, decision)
            scores[frame] = result
            if settings.dicom and reader.kind == "DICOM" and frame == todo[-1]:
                with profiling.stage("write"):
                    dicom = _add_dicom(key, frames, scores, log.out_dir, settings, decision, summary)
                record.update(dicom)
            with profiling.stage("write"):
                log.write(record)
            done[frame] = record
            summary.scored += 1
            summary.windows += result.scored
            summary.seconds += seconds
            bar.set_postfix_str(f"{label}: {result.scored / max(seconds, 1e-9):.0f} windows/s", refresh=True)
    if volume_due:
        log.write({**_volume_record(key, frames, done, common, decision), **dicom})


def _add_dicom(key: str, frames: int, scores: dict[int, ImageScore], out_dir: Path, settings: Settings,
               decision: Decision, summary: RunSummary) -> dict[str, str]:
    """heatmaps/<name>.dcm, the Parametric Map of every frame of a DICOM file, as {"dicom": relative path};
    {} when a frame has no score from this run (failed, or done by an earlier one: --resume) or it cannot
    be written (listed in the summary)."""
    missing = [f for f in range(frames) if f not in scores]
    try:
        if missing:
            raise SwsslError(f"{len(missing)} of {frames} frame(s) not scored by this run (failed, or done "
                             "before --resume): run without --resume for the whole file's map")
        from swssl.inference.dicom_out import write_parametric_map  # imports highdicom

        threshold = decision.threshold
        path = write_parametric_map(key, [scores[f] for f in range(frames)], out_dir / HEATMAPS,
                                    heatmap_name(key, 0, 1), threshold=None if threshold is None else threshold.value,
                                    threshold_description="" if threshold is None else threshold.description,
                                    scorer=settings.scorer_name)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the scores stand; say why the DICOM object is missing
        summary.unwritten.append((f"DICOM heatmap of {key}", one_line(f"no DICOM heatmap: {_error_message(exc)}")))
        return {}
    return {"dicom": f"{HEATMAPS}/{path.name}"}


def _add_heatmap(record: dict[str, Any], result: ImageScore, overlay: Overlay | None, key: str, frame: int,
                 frames: int, out_dir: Path, summary: RunSummary, decision: Decision) -> None:
    """Write the slide's heatmap files into `record`, titled with what its score means and how it was
    scored (and its out-of-domain warning); one that cannot be written is noted and listed."""
    try:
        title = [score_line(result.score, record.get("percentile"), decision.threshold),
                 f"{record['scorer']} scorer · {record['mode']} mode · {record['geometry']} geometry",
                 readable(Path(key).name) + ("" if frames == 1 else f" frame {frame}")]
        title += [f"WARNING: {record['warning']}"] if record.get("warning") else []
        record.update(write_heatmap(out_dir, heatmap_name(key, frame, frames), result, overlay, title,
                                    decision.calibration, decision.threshold))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the score stands; say why its picture is missing
        record["message"] = one_line(f"no heatmap: {_error_message(exc)}")
        summary.unwritten.append((f"heatmap of {key}" + (f" frame {frame}" if frames > 1 else ""), record["message"]))


def _volume_record(key: str, frames: int, done: dict[int, dict[str, Any]], common: dict[str, Any],
                   decision: Decision) -> dict[str, Any]:
    """The volume's row: the max over its scored frames (its percentile and flag those of that frame among
    normal frames); an error when a frame failed, empty when all are."""
    missing = [f for f in range(frames) if f not in done]
    base = {"path": key, "frame": VOLUME, "score": None, "frames": frames, **common}
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        return {**base, "status": "error", "message": f"no volume score: {len(missing)} of {frames} frame(s) "
                                                      f"failed ({listed})"}
    totals = {k: sum(float(r.get(k) or 0) for r in done.values()) for k in ("windows_scored", "windows_skipped",
                                                                          "seconds")}
    counts = {"windows_scored": int(totals["windows_scored"]), "windows_skipped": int(totals["windows_skipped"]),
              "seconds": round(totals["seconds"], 3)}
    scores = {f: float(r["score"]) for f, r in done.items() if r.get("status") == "ok"}
    if not scores:
        return {**base, **counts, "status": "empty", "message": f"no foreground in any of the {frames} frames"}
    best = max(scores, key=lambda f: (scores[f], -f))
    empty = frames - len(scores)
    warnings = sorted({r["warning"] for r in done.values() if r.get("warning")})
    return {**base, **counts, **decision.judge(scores[best]), "warning": "; ".join(warnings),
            "score": scores[best], "best_frame": best, "status": "ok",
            "message": f"max over {frames} frames, at frame {best}" + (f" ({empty} empty)" if empty else "")}


def format_summary(summary: RunSummary, limit: int = 5) -> str:
    """What the command prints at the end: counts, speed, where the results are, the first failures
    (names escaped for the terminal)."""
    lines = [f"scored {summary.scored} slide(s), {summary.windows} windows in {summary.seconds:.1f} s "
             f"({summary.windows_per_second:.0f} windows/s)"
             + (f"; {summary.empty} of them empty (no foreground, no score)" if summary.empty else "")
             + (f"; {summary.resumed} file(s) already done (--resume)" if summary.resumed else ""),
             f"results: {summary.out_dir / SCORES_CSV}"]
    if summary.gallery is not None:
        lines.append(f"gallery: {summary.gallery}")
    if summary.failures:
        lines.append(f"{len(summary.failures)} slide(s) failed:")
        for path, frame, message in summary.failures[:limit]:
            lines.append(f"  {path}{f' frame {frame}' if frame else ''}: {message}")
        if len(summary.failures) > limit:
            lines.append(f"  ... and {len(summary.failures) - limit} more (status error in {SCORES_CSV})")
    if summary.unwritten:
        lines.append(f"{len(summary.unwritten)} output(s) could not be written:")
        lines += [f"  {what}: {why}" for what, why in summary.unwritten[:limit]]
        if len(summary.unwritten) > limit:
            lines.append(f"  ... and {len(summary.unwritten) - limit} more")
    return "\n".join(for_terminal(line) for line in lines)
