"""Extraction across ``torchrun`` processes: one cache, identical to a single-process run.

Extraction (``torchrun --nproc-per-node N -m xfeat extract DATA --cache C ...``):

* rank 0 takes the cache's lock, scans the dataset and plans the run exactly as one process would
  (``plan_extraction``: file hashes, the global window statistics, the groups, what the cache lacks) and
  sends the plan to every rank. So statistics, settings checks and the refusal to mix settings happen
  once, against the one cache, and every rank converts with the same window.
* each rank takes the planned images whose content hash falls in its shard (``int(sha256, 16) % N``: stable
  across runs, disjoint, balanced) and extracts them with the ordinary single-process ``extract`` into its
  own cache ``C.rank<k>.h5``, with its own journal and lock: a rank that dies leaves its shard resumable
  like any interrupted run, and rerunning the same command resumes it.
* after all ranks are done, rank 0 appends the ranks' rows to C in dataset order, the order one process
  would have written them, through C's own journal and atomic commit (a crash leaves the last committed C
  plus the merged batches, merged first by the next run), and deletes the rank caches only once C is in
  place. The merged cache's datasets are those of a single-process run.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from xfeat.features.extractor import build_extractor
from xfeat.features.cache import CacheError, GroupSettings, Rows, cache_bytes, open_cache
from xfeat.features.writer import CacheWriter
from xfeat.io.dataset import Dataset, ImageRecord, find_images
from xfeat.errors import DataError, XfeatError, XfeatWarning
from xfeat.features.engines import resolve_engine
from xfeat.features.precision import BF16_FLAGS, PrecisionCheck, choose_precision, cpu_flags
from xfeat.features.decoding import Work
from xfeat.features.extract import ExtractConfig, ExtractSummary, extract, plan_extraction, recorded_setting
from xfeat.features.inference import resolve_precision, select_device
from xfeat.convert.stats import WindowStats

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
# Ranks wait for rank 0's planning pass and, at the end, for the slowest shard (after a crash, for the shard
# left to finish): hours on a large dataset, far beyond NCCL's default 10 minutes. A rank that dies is noticed
# by torchrun, which stops the others, not by this timeout.
TIMEOUT = timedelta(days=7)
MERGE_ROWS = 256  # images per merged journal batch


@dataclass(frozen=True)
class TorchrunWorld:
    rank: int
    size: int
    local_rank: int


def torchrun_world() -> TorchrunWorld | None:
    """This process's place when started by ``torchrun`` (from the variables it sets), else ``None``."""
    if not all(os.environ.get(name) for name in TORCHRUN_ENV):
        return None
    return TorchrunWorld(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def shard_of(sha256: str, world_size: int) -> int:
    """The rank that extracts an image: by content, so the split does not depend on file order or names."""
    return int(sha256, 16) % world_size


def rank_cache_path(cache: str | os.PathLike[str], rank: int) -> Path:
    return Path(f"{cache}.rank{rank}.h5")


def remove_rank_caches(cache: str | os.PathLike[str]) -> None:
    """Delete the ranks' caches with their journals, locks and temporary copies."""
    cache = Path(cache)
    name = glob.escape(cache.name)
    for path in [*cache.parent.glob(f"{name}.rank*.h5*"), *cache.parent.glob(f".{name}.rank*.h5.*.tmp")]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def rank_device(spec: str, local_rank: int) -> torch.device:
    """``auto``/``cuda`` give each rank its own GPU, ``cuda:LOCAL_RANK``; otherwise the device asked for."""
    if spec.startswith("cuda:"):
        raise XfeatError(f"--device {spec}: under torchrun each process uses cuda:LOCAL_RANK; "
                         "give --device cuda (or auto)")
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise XfeatError(f"process {local_rank} on this node but only {count} CUDA device(s): start at most "
                             f"{count} per node (--nproc-per-node), or use --device cpu")
        return torch.device("cuda", local_rank)
    return select_device(spec)


@dataclass(frozen=True)
class _Assignment:
    """What rank 0 sends every rank: the window to convert with and the planned work with content hashes."""

    stats: WindowStats | None
    root: Path
    source: Path
    todo: list[tuple[Work, str]]  # (work, sha256), in dataset order


def extract_distributed(data: str | os.PathLike[str], cache: str | os.PathLike[str], config: ExtractConfig, *,
                        skip_bad: bool = False, progress: Callable[[int], None] | None = None,
                        on_plan: Callable[[int, int], None] | None = None) -> ExtractSummary:
    """``extract`` as one rank of a ``torchrun`` job (see the module docstring); a plain ``extract`` when
    not under torchrun or alone. Rank 0 returns the whole run's summary, other ranks their shard's.

    ``on_plan(to_compute_here, already_cached)`` and ``progress(n)`` report this rank's own shard.
    """
    world = torchrun_world()
    if world is None or world.size == 1:
        return extract(data, cache, config, skip_bad=skip_bad, progress=progress, on_plan=on_plan)
    config.validate()
    if config.taps != ("pool",) or config.tiles is not None:
        raise XfeatError("torchrun extraction stores the pooled tap of whole images only; run xfeat extract "
                         "without torchrun for --taps local, --patch-maps or --tiles")
    device = rank_device(config.device, world.local_rank)
    # every rank settles auto the same way, from the cache as the run finds it; --precision auto is fp32 on a CPU
    # here (the bf16 check of a single-process run would have to agree across ranks), recorded as such
    recorded = recorded_setting(cache, config, "precision") if config.precision == "auto" else None
    check = torchrun_precision_check() if config.precision == "auto" and device.type == "cpu" and not recorded else None
    config = replace(config, device=str(device), precision=recorded or resolve_precision(config.precision, device),
                     engine=resolve_engine(config.engine, device, recorded_setting(cache, config, "engine")))
    started_here = not dist.is_initialized()
    if started_here:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        if world.rank == 0:
            return _lead(data, Path(cache), config, device, world, skip_bad, progress, on_plan, check)
        job = _share(None)
        if job is None:
            raise XfeatError("rank 0 stopped the run (see its error)")
        summary = _extract_shard(Path(cache), config, job, world, skip_bad, progress, on_plan)
        dist.gather_object((summary.computed, summary.skipped), None, dst=0)
        return summary
    finally:
        if started_here:
            dist.destroy_process_group()


def _share(job: _Assignment | None) -> _Assignment | None:
    """Rank 0's assignment (``None``: rank 0 failed) to every rank."""
    box = [job]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def torchrun_precision_check() -> PrecisionCheck:
    """What --precision auto settles on a CPU under torchrun: fp32, from the flags or by rule."""
    flags = cpu_flags()
    check = choose_precision(None, None, None, flags)
    if any(f in flags for f in BF16_FLAGS):
        return PrecisionCheck("fp32", "torchrun runs keep fp32 (bf16 is not checked across ranks)", check.isa)
    return check


def _lead(data, cache: Path, config: ExtractConfig, device: torch.device, world: TorchrunWorld, skip_bad: bool,
          progress, on_plan, check: PrecisionCheck | None = None) -> ExtractSummary:
    start = time.perf_counter()
    precision = resolve_precision(config.precision, device)
    summary = ExtractSummary(device=str(device), precision=precision, engine=config.engine, precision_check=check)
    job = None
    try:
        with CacheWriter(cache) as writer:  # held to the end: no other run writes C or the rank caches meanwhile
            if not cache.exists():  # rank caches beside a deleted cache: start afresh, as one process would
                remove_rank_caches(cache)
            dataset = data if isinstance(data, Dataset) else find_images(data, skip_bad=skip_bad)
            extractors = {name: build_extractor(name, config.weights) for name in config.backbones}
            plan = plan_extraction(writer, dataset, config, extractors, precision, skip_bad,
                                   (lambda *_: check) if check else None)
            hashes = {r.path: s.sha256 for r, s in zip(plan.scan.records, plan.scan.images)}
            job = _Assignment(plan.stats, dataset.root, dataset.source,
                              [(w, hashes[w.record.path]) for w in plan.work])
            _share(job)
            summary.cached = len(plan.scan.records) - len(plan.work)
            summary.groups = [g.key for g in plan.groups.values()]
            own = _extract_shard(cache, config, job, world, skip_bad, progress,
                                 (lambda todo, _: on_plan(todo, summary.cached)) if on_plan else None)
            results: list = [None] * world.size
            dist.gather_object((own.computed, own.skipped), results, dst=0)  # every rank has finished its shard
            summary.computed = sum(computed for computed, _ in results)
            summary.skipped = list(plan.scan.skipped) + [s for _, skipped in results for s in skipped]
            summary.colour = plan.scan.colour
            _merge(writer, cache, plan.groups, job.todo, world.size, {s.path for s in summary.skipped})
    finally:
        if job is None:  # rank 0 failed before the others got their work: let them stop rather than wait
            _share(None)
    remove_rank_caches(cache)  # only once C is committed: until then they are what a rerun resumes from
    summary.seconds = time.perf_counter() - start
    summary.cache_bytes = cache_bytes(cache)  # the index and its segments
    return summary


def _extract_shard(cache: Path, config: ExtractConfig, job: _Assignment, world: TorchrunWorld, skip_bad: bool,
                   progress, on_plan) -> ExtractSummary:
    """Extract this rank's share of the planned work into its own cache (one ``extract`` per method set)."""
    mine: dict[tuple[str, ...], list[ImageRecord]] = {}
    for work, sha in job.todo:
        if shard_of(sha, world.size) == world.rank:
            mine.setdefault(work.methods, []).append(work.record)
    if on_plan:
        on_plan(sum(map(len, mine.values())), 0)
    summary = ExtractSummary()
    with warnings.catch_warnings():  # rank 0 already warned about leaks, for the whole dataset
        warnings.filterwarnings("ignore", message=".*a leak between folds", category=XfeatWarning)
        for methods, records in mine.items():
            shard = Dataset(root=job.root, source=job.source, records=tuple(records))
            # jobs=1: the statistics are given, so the shard's scan only hashes its own files
            done = extract(shard, rank_cache_path(cache, world.rank),
                           replace(config, methods=methods, stats=job.stats, jobs=1), skip_bad=skip_bad,
                           progress=progress)
            summary.computed += done.computed
            summary.skipped += done.skipped
    return summary


def _merge(writer: CacheWriter, cache: Path, groups: dict[tuple[str, str, str], GroupSettings],
           todo: Sequence[tuple[Work, str]], world_size: int, skipped: set[str]) -> None:
    """Append every rank's rows to the cache's journal in dataset order: the rows, their order and so every
    dataset of the cache come out as one process would have written them."""
    with _RankCaches(cache, world_size) as ranks:
        for start in range(0, len(todo), MERGE_ROWS):
            chunk = [(w, sha) for w, sha in todo[start:start + MERGE_ROWS] if str(w.record.path) not in skipped]
            rows_by_key = {}
            for (_, method, _), settings in groups.items():
                wanted = [(w.record, sha) for w, sha in chunk if method in w.methods]
                if wanted:
                    rows_by_key[settings.key] = ranks.rows(settings, wanted)
            if rows_by_key:
                writer.add(rows_by_key)


class _RankCaches:
    """The ranks' caches, opened read-only by rank 0 for the merge."""

    def __init__(self, cache: Path, world_size: int) -> None:
        self.cache, self.world_size = cache, world_size
        self.files: dict[int, object] = {}
        self.index: dict[tuple[int, str], dict[str, int]] = {}

    def __enter__(self) -> "_RankCaches":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()

    def _group(self, rank: int, settings: GroupSettings):
        path = rank_cache_path(self.cache, rank)
        if rank not in self.files:
            if not path.exists():
                raise CacheError(f"{path}: not found, though rank {rank} wrote it: the cache's folder must be on a "
                                 "filesystem every node shares")
            self.files[rank] = open_cache(path)
        f = self.files[rank]
        if settings.key not in f:
            raise CacheError(f"{path}: holds no {settings.key}; run the same command again")
        group = f[settings.key]
        if (rank, settings.key) not in self.index:
            diffs = settings.differences(GroupSettings.from_attrs(group.attrs))
            if diffs:  # e.g. another precision on a node with another device
                raise CacheError(f"{path}: {settings.key} was computed with other settings: {'; '.join(diffs[:3])}")
            self.index[rank, settings.key] = {p: i for i, p in enumerate(group["path"].asstr()[:])}
        return group, self.index[rank, settings.key]

    def rows(self, settings: GroupSettings, wanted: Sequence[tuple[ImageRecord, str]]) -> Rows:
        """The features of ``wanted`` (record, planned sha256) read from the ranks that own them, in order."""
        n = len(wanted)
        features = np.empty((n, settings.n_flips, settings.feature_dim), np.float32)
        sha = np.empty(n, "S64")
        height, width = np.empty(n, np.int32), np.empty(n, np.int32)
        owners: dict[int, list[int]] = {}
        for i, (_, digest) in enumerate(wanted):
            owners.setdefault(shard_of(digest, self.world_size), []).append(i)
        for rank, positions in owners.items():
            group, index = self._group(rank, settings)
            try:
                rows = np.array([index[str(wanted[i][0].path)] for i in positions])
            except KeyError as e:
                raise CacheError(f"{rank_cache_path(self.cache, rank)}: holds no features of {e.args[0]}; "
                                 "run the same command again") from None
            features[positions] = _read_rows(group["pool"], rows)
            sha[positions] = _read_rows(group["sha256"], rows)
            height[positions] = _read_rows(group["height"], rows)
            width[positions] = _read_rows(group["width"], rows)
        digests = sha.astype(str).tolist()
        for (record, planned), got in zip(wanted, digests):
            if got != planned:
                raise DataError(record.path, "changed while the run was extracting it; run the same command again")
        records = [record for record, _ in wanted]
        return Rows(features=features, path=[str(r.path) for r in records], relpath=[r.relpath for r in records],
                    bundle=[r.bundle for r in records], label=[r.label for r in records], sha256=digests,
                    height=height.tolist(), width=width.tolist())


def _read_rows(dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` in the order given (h5py reads increasing indices only)."""
    order = np.argsort(rows)
    out = np.empty((len(rows), *dataset.shape[1:]), dataset.dtype)
    out[order] = dataset[rows[order]]
    return out
