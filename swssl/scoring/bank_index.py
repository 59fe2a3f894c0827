"""A FAISS index over bank rows, for the `global` scorer when the bank is too large to scan.

- `flat` (IndexFlatL2): exact, the same neighbours as the brute force (swssl.scoring.scorers.knn_distances),
  with FAISS's CPU kernels;
- `ivf` (IndexIVFFlat): approximate, an inverted file: the rows are split into `ivf_lists(N)` k-means cells and
  a query scans only the IVF_NPROBE cells nearest to it.

Why IVF and these parameters (bench/bank_scaling.py; 2 shared CPU cores, faiss-cpu 1.15 AVX2, 2 threads;
synthetic 512-d clustered non-negative embeddings: 2000 centres + rank-16 spread + noise; a slice = 600
queries, 90 % bank rows + noise, 10 % far-off "anomalies"):
- 100k rows, brute force 956 ms/slice. IVF nlist 4096: nprobe 8: 48 ms, recall@1 0.918 (normal queries
  1.000, far-off 0.18); nprobe 16: 66 ms, 0.948; nprobe 32: 102 ms, 0.993 (normal 1.000, far-off 0.93);
  build 39 s. nlist 1024 / 256 scan far more rows per probe: nprobe 32 gives 1789 / 4549 ms at 0.952 / 0.988.
  Normal-looking queries reach recall 1.0 from nprobe 2; the far-off ones (equidistant from everything in
  512-d) are what needs many probes, and their missed neighbours are within a fraction of a percent.
- bench/bank_scaling.py at 100k rows (another process benchmarking on the same cores): brute force 998 ms,
  flat 593 ms, ivf (nlist 4096, nprobe 32) 151 ms, build 46 s, recall@1 0.977: normal queries 1.000, far-off
  0.767, their missed distances 0.8 % too large on average; nprobe 64: recall 1.000 (far-off too) at about
  2.5 x the time. nprobe 32 is kept: the misses are anomalies whose score is already far above normal, and
  overestimated by < 1 %; raise IVF_NPROBE to 64 where recall@1 must be 0.99 on far-off queries too.
  10k rows: brute force 133 ms, flat 82 ms, ivf (nlist 625) 102 ms, recall@1 0.973.
- HNSW was not chosen: its build (efConstruction 200) took 26 s for 20k rows, i.e. about half an hour for
  1M rows on two cores, while IVF's build is one k-means on a sample plus one assignment pass.
The 50 ms/slice target at 1M rows is not met on this machine (see bench/bank_scaling.py's report).

A built index can be saved beside its bank (`save_index`) with what it is valid for: the bank's sha256, the
kind and its parameters, the coreset ratio / seed and a digest of the rows it holds, and the index file's own
sha256. `load_index` returns None when any of it differs (the caller then builds one in memory), so a stale
or damaged index never gives scores; an index file FAISS cannot read is a one-line SwsslError naming it.

faiss is imported only when an index is built, so the toolkit runs without it. The index lives in host
memory (faiss-cpu): queries on another device are moved to the host and the distances back.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from swssl.errors import ConfigError, SwsslError
from swssl.files import atomic_write, sha256_file

KINDS = ("flat", "ivf")
APPROXIMATE = "ivf"  # the kind the automatic choice uses above AUTO_INDEX_ROWS
# Cells: IVF_LISTS_PER_SQRT x sqrt(rows), at most rows / IVF_MIN_ROWS_PER_LIST and IVF_MAX_LISTS. 16 sqrt(N) is
# the top of FAISS's usual 4..16 sqrt(N) range: on clustered banks finer cells lose nothing for normal queries
# and scan fewer rows per probe (100k rows: nlist 4096 at nprobe 32 = 102 ms against 1789 ms with 1024).
# The cap keeps the k-means affordable on a CPU (4096 cells x 131k training rows x 10 iterations: 35 s).
IVF_LISTS_PER_SQRT = 16
IVF_MIN_ROWS_PER_LIST = 16
IVF_MAX_LISTS = 4096
IVF_NPROBE = 32  # cells scanned per query: 100k rows: recall@1 0.98-0.99, normal queries 1.0 (measured above)
IVF_TRAIN_PER_LIST = 32  # k-means training rows per cell (a sample of the bank)
IVF_TRAIN_ITERATIONS = 10
INDEX_FORMAT = "swssl-bank-index/1"
# The automatic choice (GlobalScorer index=None): the brute force below this many rows, APPROXIMATE from it.
# Measured per 600-query slice (bench/bank_scaling.py, 2 CPU threads): 10k rows: brute force 133 ms, ivf 102 ms
# (+ 1 s to build): about even, so the brute force (exact, no build) stays; 100k rows: brute force 956-998 ms,
# ivf 102-151 ms (+ 39-46 s to build once, saved beside the bank by swssl-bank): ivf.
AUTO_INDEX_ROWS = 100_000


def _faiss() -> ModuleType:
    try:
        import faiss
    except ImportError:
        raise ConfigError("a FAISS index (--index) needs faiss: pip install faiss-cpu") from None
    return faiss


def faiss_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("faiss") is not None
    except (ImportError, ValueError):  # a faiss set to None in sys.modules (tests) or a broken one
        return False


def ivf_lists(rows: int) -> int:
    """The number of IVF cells for a bank of `rows` rows."""
    return max(1, min(IVF_MAX_LISTS, rows // IVF_MIN_ROWS_PER_LIST, round(IVF_LISTS_PER_SQRT * math.sqrt(rows))))


def rows_digest(rows: torch.Tensor) -> str:
    """SHA-256 of the float32 rows an index holds (shape and bytes)."""
    host = _host(rows)
    digest = hashlib.sha256(f"{host.shape}".encode())
    digest.update(memoryview(host).cast("B"))
    return digest.hexdigest()


class BankIndex:
    """Nearest bank rows of each query through a FAISS index of kind `kind` ("flat" or "ivf")."""

    def __init__(self, rows: torch.Tensor, kind: str, nprobe: int = IVF_NPROBE, seed: int = 0,
                 index: Any = None):
        if kind not in KINDS:
            raise ConfigError(f"unknown index {kind!r}; choose from {', '.join(KINDS)}")
        faiss = _faiss()
        self.kind, self.nprobe, self.size, self.dim = kind, nprobe, len(rows), rows.shape[1]
        self.lists = ivf_lists(self.size) if kind == "ivf" else None
        if index is not None:  # a saved one (load_index)
            self.index = index
            self.lists = getattr(index, "nlist", self.lists)
            return
        host = _host(rows)
        if kind == "flat":
            self.index = faiss.IndexFlatL2(self.dim)
        else:
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim), self.dim, self.lists)
            self.index.cp.niter = IVF_TRAIN_ITERATIONS
            self.index.cp.seed = seed
            self.index.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
            self.index.cp.min_points_per_centroid = 1  # small banks: fewer rows per cell than FAISS would like
            sample = np.random.default_rng(seed).choice(self.size, min(self.size, IVF_TRAIN_PER_LIST * self.lists),
                                                        replace=False)
            self.index.train(host[np.sort(sample)])
        self.index.add(host)

    @property
    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.size, "dim": self.dim,
                **({"nlist": self.lists, "nprobe": self.nprobe} if self.kind == "ivf" else {})}

    @property
    def description(self) -> str:
        return "faiss flat (exact)" if self.kind == "flat" else f"ivf nlist {self.lists} nprobe {self.nprobe}"

    def memory_bytes(self) -> int:
        """Bytes of the search structure (rows, centroids and list ids), as FAISS serialises it."""
        return int(_faiss().serialize_index(self.index).nbytes)

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Distances (Q x k, ascending, L2 not squared, as knn_distances) to the k nearest rows, on the
        queries' device."""
        if self.kind == "ivf":
            self.index.nprobe = min(self.nprobe, self.lists)
        squared, _ = self.index.search(_host(queries), k)
        return torch.from_numpy(squared).clamp_min(0).sqrt().to(queries.device)


def index_files(bank_path: str | Path, kind: str) -> tuple[Path, Path]:
    """Where the index of kind `kind` of the bank at `bank_path` lies: bank.safetensors -> bank.index-ivf.faiss
    and its metadata bank.index-ivf.json."""
    bank_path = Path(bank_path)
    stem = bank_path.name.removesuffix(".safetensors")
    return bank_path.with_name(f"{stem}.index-{kind}.faiss"), bank_path.with_name(f"{stem}.index-{kind}.json")


def _metadata(index: BankIndex, bank_sha256: str, coreset_ratio: float | None, seed: int, rows: str) -> dict:
    return {"format": INDEX_FORMAT, "bank_sha256": bank_sha256, **index.params, "coreset_ratio": coreset_ratio,
            "coreset_seed": seed if coreset_ratio is not None else None, "rows_sha256": rows}


def save_index(index: BankIndex, bank_path: str | Path, bank_sha256: str, rows_sha256: str,
               coreset_ratio: float | None = None, seed: int = 0) -> Path:
    """Write `index` (over the rows of digest `rows_sha256`: the bank's foreground rows or their coreset, as
    `rows_digest` gives it) beside the bank; returns its path."""
    faiss = _faiss()
    path, meta_path = index_files(bank_path, index.kind)
    data = faiss.serialize_index(index.index)
    atomic_write(path, lambda tmp: tmp.write_bytes(data.tobytes()))
    metadata = {**_metadata(index, bank_sha256, coreset_ratio, seed, rows_sha256),
                "index_sha256": sha256_file(path)}
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(metadata, indent=1)))
    return path


def load_index(bank_path: str | Path, kind: str, bank_sha256: str, rows: torch.Tensor,
               coreset_ratio: float | None = None, seed: int = 0) -> tuple[BankIndex | None, str]:
    """The saved index of kind `kind` beside the bank if it is valid for these rows, else None; and why not."""
    path, meta_path = index_files(bank_path, kind)
    if not path.is_file() or not meta_path.is_file():
        return None, f"no saved {kind} index beside {bank_path}"
    try:
        saved = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"{meta_path}: unreadable ({type(exc).__name__})"
    expected = {"format": INDEX_FORMAT, "bank_sha256": bank_sha256, "kind": kind, "rows": len(rows),
                "dim": rows.shape[1], "coreset_ratio": coreset_ratio,
                "coreset_seed": seed if coreset_ratio is not None else None}
    if kind == "ivf":
        expected.update(nlist=ivf_lists(len(rows)))  # nprobe is a search setting: the current IVF_NPROBE applies
    differing = [key for key, value in expected.items() if saved.get(key) != value]
    if differing:
        return None, f"{path}: saved for another bank or settings ({', '.join(differing)} differ)"
    if saved.get("rows_sha256") != rows_digest(rows):
        return None, f"{path}: saved for other rows"
    if sha256_file(path) != saved.get("index_sha256"):
        return None, f"{path}: damaged (its bytes do not match the sha256 in {meta_path.name})"
    faiss = _faiss()
    try:
        index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
    except Exception as exc:
        raise SwsslError(f"{path}: FAISS cannot read this index ({' '.join(str(exc).split())[:160]}); "
                         "delete it or rebuild it with swssl-bank RUN_DIR --index KIND") from None
    if index.ntotal != len(rows) or index.d != rows.shape[1]:
        return None, f"{path}: holds {index.ntotal} x {index.d} rows, not {len(rows)} x {rows.shape[1]}"
    return BankIndex(rows, kind, IVF_NPROBE, seed, index=index), f"saved index {path}"


def _host(rows: torch.Tensor):
    """The contiguous float32 host array FAISS takes."""
    return rows.detach().to("cpu", torch.float32).contiguous().numpy()
