"""A FAISS index over bank rows, for the `global` scorer when the bank is too large to scan.

- `flat` (IndexFlatL2): exact, the same neighbours as the brute force (swssl.scoring.scorers.knn_distances),
  with FAISS's CPU kernels;
- `hnsw` (IndexHNSWFlat): approximate, a graph search whose cost grows about with log(bank size).
  M = 32, efConstruction = 200 and efSearch = 64 are common starting values, not optima measured on banks.

faiss is imported only when an index is built, so the toolkit runs without it. The index lives in host
memory (faiss-cpu): queries on another device are moved to the host and the distances back.
"""
from __future__ import annotations

from types import ModuleType

import torch

from swssl.errors import ConfigError

KINDS = ("flat", "hnsw")
HNSW_M = 32  # graph neighbours per node
HNSW_EF_CONSTRUCTION = 200  # candidate list while building
HNSW_EF_SEARCH = 64  # candidate list while searching (raised to k when k is larger)


def _faiss() -> ModuleType:
    try:
        import faiss
    except ImportError:
        raise ConfigError("a FAISS index (--index) needs faiss: pip install faiss-cpu") from None
    return faiss


class BankIndex:
    """Nearest bank rows of each query through a FAISS index of kind `kind` ("flat" or "hnsw")."""

    def __init__(self, rows: torch.Tensor, kind: str, ef_search: int = HNSW_EF_SEARCH):
        if kind not in KINDS:
            raise ConfigError(f"unknown index {kind!r}; choose from {', '.join(KINDS)}")
        faiss = _faiss()
        self.kind, self.ef_search, self.size = kind, ef_search, len(rows)
        dim = rows.shape[1]
        if kind == "flat":
            self.index = faiss.IndexFlatL2(dim)
        else:
            self.index = faiss.IndexHNSWFlat(dim, HNSW_M)
            self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self.index.add(_host(rows))

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Distances (Q x k, ascending, L2 not squared, as knn_distances) to the k nearest rows, on the
        queries' device."""
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        squared, _ = self.index.search(_host(queries), k)
        return torch.from_numpy(squared).clamp_min(0).sqrt().to(queries.device)


def _host(rows: torch.Tensor):
    """The contiguous float32 host array FAISS takes."""
    return rows.detach().to("cpu", torch.float32).contiguous().numpy()
