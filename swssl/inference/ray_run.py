"""`swssl-infer --ray`: the run of `run_inference`, its files scored by a pool of Ray actors (Ray Data).

The items are files, not frames: the driver then never reads the storage (counting a volume's frames
would mean opening every header on one machine, serially), a file is opened once (a DICOM volume's or
a tiled TIFF's header is parsed once), its volume row needs all its frames, and a native gigapixel slide
streams strip by strip inside its worker as it does in one process. Files, not frames, are what
balances across workers: a run holds many more files than workers.

The driver finds the files (`find_slides`), holds the lock on OUT, writes the run header, skips what
`--resume` finds finished, and is the only writer of scores.jsonl / scores.csv (each row as it arrives,
fsynced, in the order files finish) and of index.html. Each worker opens the run once (the memory bank
reaches it once, through the object store), scores a file with the runner's own code (`score_path`),
writes that file's heatmaps into OUT/heatmaps itself (atomically: they are per-file) and sends its rows
back. A worker that dies is restarted and its file retried (Ray's actor fault tolerance); a file whose
result came already is not written twice; a file whose every attempt killed its worker is an error row.
OUT, the model and the slides must be on a file system that every node sees under the same paths.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from swssl.errors import SwsslError
from swssl.files import FolderLock
from swssl.inference.results import VOLUME, ResultLog
from swssl.inference.run import OpenRun, open_run
from swssl.inference.runner import (RunSummary, Settings, common_fields, error_recorder, open_results, run_header,
                                    sayer, score_path, slides_to_score, with_batch)
from swssl.scoring.scorers import build_scorer

INSTALL = "pip install 'swssl[ray]'"
TASK_RETRIES = 2  # a file whose scoring kills its worker this many more times is given up (an error row)


class RayError(SwsslError):
    """Ray missing, or a cluster that cannot be reached or run the workers: an environment error."""

    exit_code = 2


def import_ray() -> Any:
    """The ray module, or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra: ray[data])
    except ImportError as exc:
        raise RayError(f"--ray needs Ray Data ({exc}): {INSTALL}") from None
    return ray


@dataclass
class FileResult:
    """What a worker sends back for one file: its rows in order, what to say, and its counts."""

    path: str
    rows: list[dict[str, Any]]
    messages: list[str]
    summary: RunSummary


class _Rows:
    """A worker's stand-in for the ResultLog: it collects the rows that the driver then writes."""

    def __init__(self, out_dir: Path, finished: dict[tuple[str, str], dict[str, Any]]):
        self.out_dir, self.finished, self.rows = out_dir, finished, []

    def write(self, record: dict[str, Any]) -> None:
        self.rows.append(record)


class FileScorer:
    """The Ray Data actor: opens the run once (backend on its own device, the bank from the object store),
    then scores one file per batch row with the single-process runner's code."""

    def __init__(self, model: str, kind: str, device: str, precision: str | None, mode: str | None, bank: Any,
                 settings: Settings, out_dir: str, resume: bool):
        import ray

        from swssl.device import parse_device

        bank = ray.get(bank) if isinstance(bank, ray.ObjectRef) else bank
        self.model = open_run(model, kind, parse_device(device), precision, mode, bank=bank)
        self.scorer = build_scorer(settings.scorer_name, self.model.bank, self.model.backend.device,
                                   **settings.scorer_options)
        settings, batch = with_batch(settings, self.model)  # probed on this worker's device, unless --batch
        self.decision, header = run_header(self.model, settings, resume, batch)
        self.common = common_fields(header, settings)  # this worker's backend and device, in its rows
        self.settings, self.out_dir = settings, Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
        return {"result": [pickle.dumps(self.score(os.fsdecode(path), pickle.loads(finished)))
                           for path, finished in zip(batch["path"], batch["finished"])]}

    def score(self, key: str, finished: dict[tuple[str, str], dict[str, Any]]) -> FileResult:
        rows, summary, messages = _Rows(self.out_dir, finished), RunSummary(self.out_dir), []
        record_error = error_recorder(rows, self.common, summary, messages.append)
        with tqdm(disable=True) as bar:
            score_path(Path(key), self.model, self.scorer, self.settings, rows, summary, bar, self.common,
                       record_error, self.decision, messages.append)
        return FileResult(key, rows.rows, messages, summary)


def finished_files(finished: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[tuple[str, str], dict]]:
    """The finished results of each file, by path."""
    by_file: dict[str, dict[tuple[str, str], dict]] = {}
    for (path, frame), record in finished.items():
        by_file.setdefault(path, {})[(path, frame)] = record
    return by_file


def is_complete(key: str, done: dict[tuple[str, str], dict[str, Any]]) -> bool:
    """Whether a file's finished results cover all its frames (and its volume row), known without opening it:
    each frame's row records how many frames the file has."""
    frames = done.get((key, "0"), {}).get("frames")
    return (isinstance(frames, int) and all((key, str(f)) in done for f in range(frames))
            and (frames == 1 or (key, VOLUME) in done))


@contextlib.contextmanager
def ray_session(ray: Any, address: str | None, cpus: int) -> Iterator[None]:
    """Ray for the run: the caller's when this process is already connected (left running), else the cluster
    at `address`, else a local instance of `cpus` CPUs, quiet, without a dashboard, stopped at the end."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, num_cpus=None if address else cpus, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)
    except Exception as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RayError(f"cannot start or reach {where}: {' '.join(str(exc).split())[:300]}") from None
    try:
        yield
    finally:
        ray.shutdown()


def pool_size(resources: dict[str, float], workers: int | None, gpus_per_worker: float) -> int:
    """--workers, else as many as the cluster's GPUs (at `gpus_per_worker` each) or CPUs (one each) allow."""
    if workers is None:
        workers = (int(resources.get("GPU", 0) // gpus_per_worker) if gpus_per_worker > 0
                   else int(resources.get("CPU", 1)))
    if workers < 1:
        raise RayError(f"no Ray worker fits this cluster ({resources.get('GPU', 0):g} GPU, "
                       f"{gpus_per_worker:g} per worker): give --workers or --gpus-per-worker 0")
    return workers


def run_ray(slides: Sequence[str | Path], model: OpenRun, out_dir: str | Path, settings: Settings, *,
            backend: str, device: str, precision: str | None, mode: str | None, resume: bool = False,
            progress: bool = True, exclude: Sequence[str] = (), address: str | None = None,
            workers: int | None = None, gpus_per_worker: float | None = None,
            echo: Callable[[str], None] | None = None) -> RunSummary:
    """`run_inference` on a Ray cluster (module docstring). `model`: the run as the driver opened it (checked,
    its header, its bank shipped to the workers); the workers open it again with `backend`, `device`,
    `precision` and `mode`. `gpus_per_worker`: None gives 1 where the cluster has GPUs, else 0."""
    ray = import_ray()
    out_dir = Path(out_dir)
    files, problems = slides_to_score(slides, out_dir, exclude)
    per_worker = "probed by each worker on its device (--batch N to fix it)" if settings.batch_size is None else ""
    _, header = run_header(model, settings, resume, per_worker)
    summary, say = RunSummary(out_dir), sayer(echo)
    common = common_fields(header, settings)
    with FolderLock(out_dir, "swssl-infer"), ray_session(ray, address, workers or os.cpu_count() or 1):
        resources = ray.cluster_resources()
        gpus = gpus_per_worker if gpus_per_worker is not None else float(bool(resources.get("GPU")) and device != "cpu")
        size = pool_size(resources, workers, gpus)
        header["ray"] = {"address": address or "local", "workers": size, "gpus_per_worker": gpus}
        with open_results(out_dir, header, resume, summary, say) as log:
            say(f"ray: {size} worker(s), {gpus:g} GPU each, at {header['ray']['address']}")
            record_error = error_recorder(log, common, summary, say)
            for argument, message in problems:
                record_error(argument, None, message)
            by_file = finished_files(log.finished)
            todo = [str(p) for p in files if not is_complete(str(p), by_file.get(str(p), {}))]
            summary.resumed += len(files) - len(todo)
            if todo:
                arguments = {"model": os.path.abspath(model.source), "kind": backend, "device": device,
                             "precision": precision, "mode": mode, "bank": ray.put(model.bank), "settings": settings,
                             "out_dir": os.path.abspath(out_dir), "resume": resume}  # workers: another cwd
                _stream(ray, todo, by_file, arguments, size, gpus, log, summary, record_error, say, progress)
    return summary


def _stream(ray: Any, todo: list[str], by_file: dict[str, dict], arguments: dict[str, Any], size: int, gpus: float,
            log: ResultLog, summary: RunSummary, record_error: Callable[..., None], say: Callable[[str], None],
            progress: bool) -> None:
    """Score `todo` on `size` actors, writing each file's rows as its result arrives (never all held)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the slides bar below says it
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notes on execution are no news to the operator
    context.max_errored_blocks = -1  # a file that keeps killing its worker is dropped, then written as an error
    items = [{"path": os.fsencode(key), "finished": pickle.dumps(by_file.get(key, {}))} for key in todo]
    with warnings.catch_warnings():  # max_restarts / max_task_retries: deprecated there, no successor yet (pyproject)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated", category=DeprecationWarning)
        results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            FileScorer, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=size),
            fn_constructor_kwargs=arguments, num_cpus=1, num_gpus=gpus, max_restarts=-1,
            max_task_retries=TASK_RETRIES)
    written: set[str] = set()
    started = time.perf_counter()
    with tqdm(total=len(todo), desc="slides", unit="slide", disable=not progress, dynamic_ncols=True) as bar:
        try:
            for row in results.iter_rows():
                result: FileResult = pickle.loads(row["result"])
                if result.path in written:  # a retried task's output that had come already
                    continue
                written.add(result.path)
                for record in result.rows:
                    log.write(record)
                for text in result.messages:
                    say(text)
                summary.merge(result.summary)
                bar.update(1)
        except ray.exceptions.RayError as exc:
            raise RayError(f"{arguments['model']}: the Ray workers failed: {_last_line(exc)}") from None
    for key in todo:
        if key not in written:
            record_error(key, None, f"no result: the Ray worker scoring it died {TASK_RETRIES + 1} times")
    elapsed = time.perf_counter() - started
    say(f"ray: {len(written)} file(s) in {elapsed:.1f} s ({len(written) / max(elapsed, 1e-9):.2f} files/s)")


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
