"""The `global` scorer's bank search as the bank grows: brute force, FAISS flat and the approximate index.

Per bank size: the time to search one slice (600 query windows by default; the median of `repeats`), the
bytes of each search structure (and the growth of the process's peak RSS while it is built, where Linux
reports it), the approximate index's build time and recall@1 against the brute force, and the time of the
k-center-greedy coreset (ratio 0.1, 0.01 from 1M rows). Threads: `threads` for torch and FAISS (2 by default,
the shared CI machine's cores).

The embeddings are synthetic but shaped like a bank's: `dim`-d, non-negative (post-ReLU), clustered around
`centres` Gaussian centres with a rank-16 spread shared by all clusters plus isotropic noise; the queries are
bank rows plus small noise (test windows resemble normal ones), and a `far` fraction of far-off points
(anomalies: equidistant from everything in 512-d, the hard case for an approximate index). recall@1 is the
share of queries whose nearest distance equals the brute force's within 0.1 %, given overall and for the
two kinds of queries; `far_excess` is the mean relative overestimate of the missed distances.
"""
from __future__ import annotations

import math
import resource
import time
from typing import Any

import torch

from swssl.bench.timing import measure

CORESET_RATIOS = {10_000: 0.1, 100_000: 0.1, 1_000_000: 0.01}  # the ratio timed per size (0.01 from 1M rows)


def synthetic_bank(rows: int, dim: int = 512, centres: int = 2000, seed: int = 0, rank: int = 16) -> torch.Tensor:
    """`rows` x `dim` float32 clustered non-negative embeddings (see the module docstring), built in chunks."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(centres, dim, generator=generator)
    basis = torch.randn(rank, dim, generator=generator) / math.sqrt(rank) * 0.3
    out = torch.empty(rows, dim)
    for start in range(0, rows, 65536):
        m = min(65536, rows - start)
        which = torch.randint(centres, (m,), generator=generator)
        out[start:start + m] = (centre[which] + torch.randn(m, rank, generator=generator) @ basis
                                + 0.1 * torch.randn(m, dim, generator=generator)).clamp_min_(0)
    return out


def synthetic_queries(bank: torch.Tensor, count: int = 600, seed: int = 1, far: float = 0.1) -> torch.Tensor:
    """`count` queries: bank rows + noise (sd 0.1), then round(far x count) far-off non-negative points."""
    generator = torch.Generator().manual_seed(seed)
    faraway = int(round(far * count))
    near = bank[torch.randint(len(bank), (count - faraway,), generator=generator)]
    near = (near + 0.1 * torch.randn(near.shape, generator=generator)).clamp_min(0)
    return torch.cat([near, (1.5 * torch.randn(faraway, bank.shape[1], generator=generator)).clamp_min(0)])


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _recall(got: torch.Tensor, exact: torch.Tensor, near: int) -> dict[str, float]:
    hit = torch.isclose(got, exact, rtol=1e-3, atol=1e-4)
    missed = ~hit[near:]
    excess = ((got[near:] - exact[near:]) / exact[near:].clamp_min(1e-12))[missed]
    return {"recall_at_1": hit.float().mean().item(), "recall_at_1_normal": hit[:near].float().mean().item(),
            "recall_at_1_far": hit[near:].float().mean().item() if len(hit) > near else None,
            "far_excess": excess.mean().item() if len(excess) else 0.0}


def bank_scaling(sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000), dim: int = 512, queries: int = 600,
                 seed: int = 0, repeats: int = 3, threads: int = 2, kinds: tuple[str, ...] = ("flat", "ivf"),
                 coreset: bool = True, far: float = 0.1) -> dict[str, Any]:
    """Search time per slice, memory, build time and recall@1 per bank size (JSON-ready; see the docstring)."""
    import faiss

    from swssl.scoring import bank_index
    from swssl.scoring.bank_index import BankIndex
    from swssl.scoring.scorers import k_center_greedy, knn_distances

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    result: dict[str, Any] = {
        "dim": dim, "queries": queries, "far_fraction": far, "threads": threads, "seed": seed,
        "faiss": faiss.__version__, "faiss_simd": faiss.get_compile_options().strip(),
        "parameters": {"ivf_lists": "min(%d, rows / %d, %d sqrt(rows))" % (
            bank_index.IVF_MAX_LISTS, bank_index.IVF_MIN_ROWS_PER_LIST, bank_index.IVF_LISTS_PER_SQRT),
            "ivf_nprobe": bank_index.IVF_NPROBE, "auto_index_rows": bank_index.AUTO_INDEX_ROWS},
        "sizes": []}
    near = queries - int(round(far * queries))
    for rows in sizes:
        started = time.perf_counter()
        bank = synthetic_bank(rows, dim, seed=seed)
        query = synthetic_queries(bank, queries, seed + 1, far)
        entry: dict[str, Any] = {"rows": rows, "generate_s": time.perf_counter() - started}
        norms = bank.pow(2).sum(-1)
        reps = 1 if rows >= 1_000_000 else repeats
        with torch.inference_mode():
            timing = measure(lambda q=query, b=bank, n=norms: knn_distances(q, b, n, 1), warmup=1, repeats=reps)
            exact = knn_distances(query, bank, norms, 1)[:, 0]
        entry["brute force"] = {"slice_ms": 1000 * timing.median, "bytes": bank.numel() * 4 + norms.numel() * 4}
        for kind in kinds:
            before = _peak_rss()
            started = time.perf_counter()
            index = BankIndex(bank, kind, seed=seed)
            build = time.perf_counter() - started
            timing = measure(lambda i=index, q=query: i.search(q, 1), warmup=1, repeats=reps)
            entry[kind] = {"slice_ms": 1000 * timing.median, "build_s": build, "bytes": index.memory_bytes(),
                           "peak_rss_growth_bytes": max(0, _peak_rss() - before), "search": index.description,
                           **_recall(index.search(query, 1)[:, 0], exact, near)}
            del index
        if coreset:
            ratio = CORESET_RATIOS.get(rows, 0.1 if rows < 1_000_000 else 0.01)
            started = time.perf_counter()
            k_center_greedy(bank, math.ceil(ratio * rows), seed=seed)
            entry["coreset"] = {"ratio": ratio, "seconds": time.perf_counter() - started}
        result["sizes"].append(entry)
        del bank, norms, query
    return result


def bank_scaling_markdown(result: dict[str, Any]) -> list[str]:
    """A markdown table of `bank_scaling`'s result, one row per bank size and search."""
    lines = [f"Bank search per slice of {result['queries']} queries ({result['dim']}-d, "
             f"{result['threads']} threads, faiss {result['faiss']} {result['faiss_simd']}; "
             f"{100 * result['far_fraction']:g} % far-off queries):", "",
             "| rows | search | ms / slice | build s | memory MB | recall@1 (normal / far-off) | coreset |",
             "|---:|---|---:|---:|---:|---|---|"]
    for entry in result["sizes"]:
        coreset = entry.get("coreset")
        core = f"{coreset['ratio']:g}: {coreset['seconds']:.1f} s" if coreset else ""
        for kind in ("brute force", "flat", "ivf"):
            if kind not in entry:
                continue
            row = entry[kind]
            build = f"{row['build_s']:.1f}" if "build_s" in row else "-"
            recall = (f"{row['recall_at_1']:.3f} ({row['recall_at_1_normal']:.3f} / "
                      f"{row['recall_at_1_far'] if row['recall_at_1_far'] is None else round(row['recall_at_1_far'], 3)})"
                      if "recall_at_1" in row else "1 (reference)")
            name = row.get("search", kind)
            lines.append(f"| {entry['rows']:,} | {name} | {row['slice_ms']:.1f} | {build} | "
                         f"{row['bytes'] / 2**20:.0f} | {recall} | {core if kind == 'brute force' else ''} |")
    return lines
