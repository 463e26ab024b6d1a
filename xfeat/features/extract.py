"""The batch extractor: decode and convert in worker processes, batched inference, results into the cache.

Each image is read and decoded once per run for all methods and backbones; each (image, method, backbone,
flip) is computed once ever: what the cache already holds with the same file content is skipped, and an
interrupted run resumes where it stopped. Batches are always padded to the same size, so an image's
features do not depend on which other images shared its batch (bitwise-equal results after a resume).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from xfeat.features.backbones import get_spec
from xfeat.features.extractor import build_extractor
from xfeat.features.local import (Tapped, check_taps, local_params, local_stages, local_statistics, map_grid,
                                  patch_maps, patch_params)
from xfeat.features.tiles import Tiling
from xfeat.features.cache import (FLIPS, GroupSettings, Rows, _settings_groups, cache_bytes, open_cache,
                                  size_token)
from xfeat.features.writer import CacheWriter
from xfeat.convert.methods import NEEDS_STATS, check_method
from xfeat.features.decoding import Work, decode_work, image_batches
from xfeat.io.dataset import Dataset, ImageRecord, Skipped, find_images, warn_leaks
from xfeat.errors import DataError, XfeatError
from xfeat.io.images import MAX_PIXELS, megapixels
from xfeat.features.engines import ENGINES, openvino_runner, resolve_engine
from xfeat.features.inference import prepare_model, resolve_precision, runner, select_device
from xfeat.features.precision import BF16_FLAGS, PrecisionCheck, choose_precision, cpu_flags
from xfeat.convert.scan import Scan, ScannedImage, scan_dataset
from xfeat.convert.stats import WindowStats

CHECK_IMAGES = 4  # images --precision auto compares fp32 and bf16 on
# Below this many pixels to decode (about 40 full-size X-rays, or 2,000 photos of 224 x 224), images are decoded in
# this process: starting the decoding workers (0.7 s on 2 cores) would cost more.
IN_PROCESS_PIXELS = 100_000_000
RESIZE = "cv2.INTER_AREA"
PIXEL_BUDGET = 4_000_000  # input pixels per forward pass: larger batches only add memory traffic on a CPU
COMMIT_EVERY_S = 300.0


@dataclass(frozen=True)
class ExtractConfig:
    """What to compute: backbones x methods at one input size, with 1, 2 or 4 flip variants."""

    backbones: tuple[str, ...] = ("resnet34",)
    methods: tuple[str, ...] = ("m1", "m2", "m3", "m4")
    size: tuple[int, int] = (2000, 1000)
    flips: int = 4
    weights: str = "imagenet"
    device: str = "auto"
    precision: str = "auto"
    engine: str = "auto"  # auto | torch | openvino (xfeat.features.engines); resolved before planning
    batch_size: int | None = None  # images per forward pass (each gives `flips` samples)
    workers: int | None = None  # decoding processes; 0 or 1 decode in this process
    jobs: int | None = None  # processes for the statistics pass
    stats: WindowStats | None = None
    max_pixels: int = MAX_PIXELS  # images (and the input size) declaring more pixels are refused undecoded
    taps: tuple[str, ...] = ("pool",)  # pool, local, patches (xfeat.features.local); pool is always stored
    tiles: Tiling | None = None  # run the backbone on tiles of `size` instead of on the image shrunk to `size`
    storage: str = "float32"  # the stored vectors' type: float32, or float16 (half the disk; patch maps always)

    def validate(self) -> None:
        if not self.backbones or not self.methods:
            raise XfeatError("give at least one backbone and one method")
        for method in self.methods:
            check_method(method)
        check_taps(self.taps)
        if "pool" not in self.taps:
            raise XfeatError("the pool tap is always stored (it costs nothing more): add pool to --taps")
        if self.tiles is not None and self.tiles.tile != self.size:
            raise XfeatError(f"the tiles are {self.tiles.tile}, the input size {self.size}: give the same")
        if self.engine not in ENGINES:
            raise XfeatError(f"unknown engine {self.engine!r}; one of {', '.join(ENGINES)}")
        if self.storage not in ("float32", "float16"):
            raise XfeatError(f"--dtype must be float32 or float16, not {self.storage}")
        if self.flips not in (1, 2, 4):
            raise XfeatError(f"--flips must be 1, 2 or 4, not {self.flips}")
        if min(self.size) < 16:
            raise XfeatError(f"input size {self.size[0]}x{self.size[1]} is too small (at least 16x16)")
        if self.max_pixels < 1:
            raise XfeatError(f"--max-pixels must be at least 1, not {self.max_pixels}")
        height, width = self.input_size
        if height * width > self.max_pixels:
            raise XfeatError(f"input size {height}x{width} ({megapixels(height * width)} "
                             f"MP) is over the limit of {megapixels(self.max_pixels)} MP; raise it with --max-pixels")
        if self.batch_size is not None and self.batch_size < 1:
            raise XfeatError("--batch-size must be at least 1")
        if (self.workers is not None and self.workers < 0) or (self.jobs is not None and self.jobs < 0):
            raise XfeatError("--workers and --jobs must be 0 or more")

    @property
    def flip_names(self) -> tuple[str, ...]:
        return FLIPS[: self.flips]

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) every image is resized to: ``size``, or the area the tiles cover."""
        return self.tiles.image_size if self.tiles else self.size

    @property
    def tile_count(self) -> int:
        return self.tiles.count if self.tiles else 1

    def images_per_batch(self) -> int:
        if self.batch_size:
            return self.batch_size
        height, width = self.input_size
        return max(1, min(64, PIXEL_BUDGET // (height * width * self.flips)))

    def forward_batch(self) -> int:
        """Inputs per forward pass: images x flips x tiles."""
        return self.images_per_batch() * self.flips * self.tile_count


@dataclass
class ExtractSummary:
    computed: int = 0  # images whose features were computed in this run
    cached: int = 0  # images already in the cache for every group
    skipped: list = field(default_factory=list)
    seconds: float = 0.0
    cache_bytes: int = 0
    groups: list[str] = field(default_factory=list)
    device: str = ""
    precision: str = ""
    engine: str = ""
    precision_check: PrecisionCheck | None = None  # how --precision auto chose the precision
    colour: bool = False  # the dataset holds colour images (gray methods took their luminance)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds else 0.0


def _flip_variants(x: torch.Tensor, flips: Sequence[str]) -> torch.Tensor:
    """[k, C, H, W] -> [k * F, C, H, W], image-major: each image's flip variants side by side."""
    variants = {"none": x, "h": x.flip(3), "v": x.flip(2), "hv": x.flip(2, 3)}
    return torch.stack([variants[f] for f in flips], dim=1).flatten(0, 1)


def extract(data: str | os.PathLike[str] | Dataset, cache: str | os.PathLike[str], config: ExtractConfig, *,
            skip_bad: bool = False, progress: Callable[[int], None] | None = None,
            on_plan: Callable[[int, int], None] | None = None) -> ExtractSummary:
    """Compute the missing features of ``data`` into ``cache``; see the module docstring.

    ``on_plan(to_compute, already_cached)`` is called once the work is known (for a progress bar);
    ``progress(n)`` after each batch with the number of images finished.
    """
    start = time.perf_counter()
    config.validate()
    dataset = data if isinstance(data, Dataset) else find_images(data, skip_bad=skip_bad)
    device = select_device(config.device)
    precision = resolve_precision(config.precision, device)
    config = replace(config, engine=resolve_engine(config.engine, device, recorded_setting(cache, config, "engine")))
    extractors = {name: build_extractor(name, config.weights) for name in config.backbones}
    choose = None
    if config.precision == "auto" and device.type == "cpu":  # the cache's precision, or one proved on this run
        recorded = recorded_setting(cache, config, "precision")
        precision = recorded or precision
        if not recorded:
            choose = partial(_check_precision, extractors=extractors, config=config, device=device)

    with CacheWriter(cache) as writer:
        plan = plan_extraction(writer, dataset, config, extractors, precision, skip_bad, choose)
        precision = plan.precision
        summary = ExtractSummary(device=str(device), precision=precision, engine=config.engine,
                                 precision_check=plan.check)
        summary.skipped = list(plan.scan.skipped)
        summary.colour = plan.scan.colour
        summary.cached = len(plan.scan.records) - len(plan.work)
        summary.groups = [g.key for g in plan.groups.values()]
        if on_plan:
            on_plan(len(plan.work), summary.cached)
        if plan.work:
            models = {b: tap_runner(e, config.taps, device, precision, config.engine) for b, e in extractors.items()}
            if config.workers is None and _decoding_pixels(plan) < IN_PROCESS_PIXELS:
                config = replace(config, workers=0)  # starting workers would cost more than decoding here
            summary.computed = _compute(plan.work, plan.groups, models, writer, config, plan.stats, device,
                                        skip_bad, summary.skipped, progress)
    summary.seconds = time.perf_counter() - start
    summary.cache_bytes = cache_bytes(cache)  # the index and its segments
    return summary


@dataclass
class Plan:
    """What a run does, decided once against the cache (torchrun runs decide it on rank 0 and share it)."""

    scan: Scan
    stats: WindowStats | None  # the global window every conversion of this run uses
    groups: dict[tuple[str, str, str], GroupSettings]  # (backbone, method, tap) -> settings
    work: list[Work]  # in dataset order: the order rows are appended to the cache
    precision: str = "fp32"  # what the network runs in
    check: PrecisionCheck | None = None  # how --precision auto chose it


def plan_extraction(writer: CacheWriter, dataset: Dataset, config: ExtractConfig, extractors: dict,
                    precision: str, skip_bad: bool,
                    choose: Callable[[Sequence[ImageRecord], WindowStats | None], PrecisionCheck] | None = None
                    ) -> Plan:
    """Hash (and for new statistics decode) every image, settle the window statistics, choose the precision
    (``choose``: --precision auto on a CPU), create the groups (refusing settings that differ from the cache's)
    and list what the cache lacks."""
    needs_stats = any(m in NEEDS_STATS for m in config.methods)
    stats = config.stats or writer.window_stats()
    # Decoding every image before extraction is only worth it for statistics nobody has yet.
    scan = scan_dataset(dataset, jobs=config.jobs, skip_bad=skip_bad, decode=needs_stats and stats is None,
                        max_pixels=config.max_pixels)
    warn_leaks(scan.records, [s.sha256 for s in scan.images])
    fitted_here = needs_stats and stats is None  # then the scan's per-bundle histograms are stored with them
    if fitted_here:
        stats = scan.window_stats()
    check = choose(scan.records, stats) if choose else None
    precision = check.precision if check else precision
    groups = {(b, m, tap): _settings(extractors[b], b, m, tap, config, precision, stats if m in NEEDS_STATS else None,
                                     check)
              for b in config.backbones for m in config.methods for tap in config.taps}
    writer.prepare(list(groups.values()),
                   {b: (e.fc_weight.numpy(), e.fc_bias.numpy()) for b, e in extractors.items()},
                   stats if needs_stats else None,
                   scan.bundle_histograms if fitted_here else None, scan.images_per_bundle() if fitted_here else None)
    work = _plan(writer, groups, scan.records, scan.images)
    return Plan(scan, stats, groups, work, precision, check)


def _decoding_pixels(plan: Plan) -> int:
    """The pixels the run's images declare: what decoding them costs, roughly."""
    sizes = {r.path: s.height * s.width for r, s in zip(plan.scan.records, plan.scan.images)}
    return sum(sizes.get(w.record.path, 0) for w in plan.work)


def _check_precision(records: Sequence[ImageRecord], stats: WindowStats | None, *, extractors: dict,
                     config: ExtractConfig, device: torch.device) -> PrecisionCheck:
    """--precision auto on a CPU: the run's first images (first method), through every backbone and tap in fp32
    and in bf16; bf16 only if all of them agree (xfeat.features.precision)."""
    flags = cpu_flags()
    if not any(f in flags for f in BF16_FLAGS):
        return choose_precision(None, None, None, flags)  # decided by the flags: nothing to run
    method = config.methods[0]
    decoded = [decode_work(Work(r, (method,)), config.input_size, stats, max_pixels=config.max_pixels)
               for r in records[:CHECK_IMAGES]]
    pixels = [item["pixels"][method] for item in decoded if not item["problem"]]
    batch = torch.from_numpy(np.stack(pixels)) if pixels else None
    checks = [choose_precision(tap_runner(e, config.taps, device, "fp32", config.engine),
                               tap_runner(e, config.taps, device, "bf16", config.engine), batch, flags)
              for e in extractors.values()]
    failed = [c for c in checks if c.precision != "bf16"]
    return failed[0] if failed else min(checks, key=lambda c: c.worst_cosine)


def _settings(extractor, backbone: str, method: str, tap: str, config: ExtractConfig, precision: str,
              stats: WindowStats | None, check: PrecisionCheck | None = None) -> GroupSettings:
    params, dim = tap_layout(backbone, tap, config, int(extractor.feature_dim))
    tiles = config.tiles
    return GroupSettings(
        backbone=backbone, method=method, input_height=config.size[0], input_width=config.size[1],
        flips=",".join(config.flip_names), feature_dim=dim,  # patches: the run's flips, the map of "none" only
        weights_kind=extractor.weights.kind, weights_name=extractor.weights.name,
        weights_sha256=extractor.weights.sha256, mean=tuple(extractor.mean), std=tuple(extractor.std),
        resize=RESIZE, precision=precision, engine=config.engine, precision_check=check.to_json() if check else "",
        g_min=stats.g_min if stats else -1, g_max=stats.g_max if stats else -1,
        tap=tap, tap_params=json.dumps(params, sort_keys=True) if params else "",
        tiles=_tiles_text(tiles), tile_overlap=tiles.overlap if tiles else 0.0,
        tile_combine=tiles.combine if tiles else "", storage="float16" if tap == "patches" else config.storage)


def _tiles_text(tiles: Tiling | None) -> str:
    return f"{tiles.rows}x{tiles.cols}" if tiles else ""


def tap_layout(backbone: str, tap: str, config: ExtractConfig, pooled_dim: int) -> tuple[dict, int]:
    """A tap's parameters (as the cache records them) and the width of its rows."""
    spec = get_spec(backbone)
    if tap == "pool":
        return {}, pooled_dim * (2 if config.tiles and config.tiles.combine == "both" else 1)
    if tap == "local":
        params = local_params(spec)
        return params, 3 * params["channels"]
    grid = (tuple(s // 8 for s in config.input_size) if config.tiles  # stitched: tiles are multiples of 32
            else map_grid(spec, config.size))
    params = patch_params(spec, grid)
    return params, params["dim"]


def tap_runner(extractor, taps: Sequence[str], device: torch.device, precision: str, engine: str = "torch"):
    """The function a batch runs through: pooled features alone, or (pooled, local map) from one pass; run by
    torch or by OpenVINO (``engine``, resolved)."""
    if set(taps) == {"pool"}:
        model = prepare_model(extractor, device)
    else:
        stages = [s.module for s in local_stages(get_spec(extractor.name))]
        model = Tapped(prepare_model(extractor, device, keep_modules=True), stages)
    return openvino_runner(model, precision) if engine == "openvino" else runner(model, device, precision)


def recorded_setting(cache: str | os.PathLike[str], config: ExtractConfig, name: str) -> str | None:
    """A setting (engine, precision) the cache's groups of these backbones, methods and geometry were computed
    with (for the engine, torch in caches written before engines were recorded); None when it holds none, and
    for groups of another input size, which this run does not write into (``auto`` decides afresh there)."""
    if not Path(cache).exists():
        return None
    geometry = size_token(*config.size, _tiles_text(config.tiles))
    with open_cache(cache) as f:
        for group in _settings_groups(f):
            settings = GroupSettings.from_attrs(group.attrs)
            if (settings.backbone in config.backbones and settings.method in config.methods
                    and settings.size_token == geometry):
                return getattr(settings, name)
    return None


def _plan(writer: CacheWriter, groups: dict[tuple[str, str, str], GroupSettings], records: Sequence[ImageRecord],
          scanned: Sequence[ScannedImage]) -> list[Work]:
    """Which images need which methods (an image missing from any tap's group is computed again for all of the
    method's taps: they come from one forward pass); labels or bundles changed for cached images are updated in
    place."""
    missing: dict[int, set[str]] = {}
    hashes = [s.sha256 for s in scanned]
    in_dataset = {str(r.path) for r in records}
    for (_, method, _), settings in groups.items():
        cached = writer.cached_images(settings.key)
        by_content = {held[0]: path for path, held in cached.items()}
        relabelled = []
        for i, (record, sha) in enumerate(zip(records, hashes)):
            path = str(record.path)
            held, twin = cached.get(path), by_content.get(sha)
            if held is None and twin is not None and twin != path and twin in in_dataset:
                continue  # a copy of another file of the dataset, cached under that name: one row per content
            if held is None or held[0] != sha:
                missing.setdefault(i, set()).add(method)
            elif held[1:] != (record.relpath, record.bundle, record.label):
                relabelled.append(record)
        if relabelled:
            writer.add({settings.key: Rows(None, [str(r.path) for r in relabelled], [r.relpath for r in relabelled],
                                           [r.bundle for r in relabelled], [r.label for r in relabelled])})
    methods_in_order = list(dict.fromkeys(m for _, m, _ in groups))
    return [Work(records[i], tuple(m for m in methods_in_order if m in methods),
                 (scanned[i].signature, scanned[i].sha256) if scanned[i].signature else None)
            for i, methods in sorted(missing.items())]


def _rows(features: np.ndarray, records: Sequence[ImageRecord], items: Sequence[dict]) -> Rows:
    return Rows(features=features, path=[str(r.path) for r in records], relpath=[r.relpath for r in records],
                bundle=[r.bundle for r in records], label=[r.label for r in records],
                sha256=[it["sha256"] for it in items], height=[it["height"] for it in items],
                width=[it["width"] for it in items])


def _compute(work: list[Work], groups, models, writer: CacheWriter, config: ExtractConfig,
             stats: WindowStats | None, device: torch.device, skip_bad: bool, skipped: list,
             progress: Callable[[int], None] | None) -> int:
    per_batch = config.images_per_batch()
    loader = image_batches(work, config.input_size, stats, per_batch, config.workers, max_pixels=config.max_pixels)
    params = {key: json.loads(s.tap_params) for key, s in groups.items() if s.tap == "patches"}
    computed = 0
    last_commit = time.monotonic()
    for batch in loader:
        good = []
        for item in batch:
            if item["problem"]:
                record = work[item["index"]].record
                if not skip_bad:
                    raise DataError(record.path, item["problem"])
                skipped.append(Skipped(str(record.path), item["problem"]))
            else:
                good.append(item)
        rows_by_key = {}
        for backbone, method in dict.fromkeys((b, m) for b, m, _ in groups):
            items = [it for it in good if method in work[it["index"]].methods]
            if not items:
                continue
            x = torch.from_numpy(np.stack([it["pixels"][method] for it in items]))
            patches = params.get((backbone, method, "patches"))
            taps = batch_taps(models[backbone], x, config.flip_names, config.forward_batch(), config.tiles,
                              config.taps, patches)
            records = [work[it["index"]].record for it in items]
            for tap, features in taps.items():
                settings = groups[(backbone, method, tap)]
                rows_by_key[settings.key] = _rows(features.astype(settings.data_dtype, copy=False), records, items)
        if rows_by_key:
            writer.add(rows_by_key)
        computed += len(good)
        if progress:
            progress(len(batch))
        if time.monotonic() - last_commit > COMMIT_EVERY_S:
            writer.commit()
            last_commit = time.monotonic()
    return computed


def batch_features(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, flips: Sequence[str],
                   forward_batch: int) -> np.ndarray:
    """[k, C, H, W] uint8 -> pooled features [k, F, D] float32 (``batch_taps`` for the pool tap alone)."""
    return batch_taps(run, x, flips, forward_batch)["pool"]


def batch_taps(run: Callable, x: torch.Tensor, flips: Sequence[str], forward_batch: int,
               tiles: Tiling | None = None, taps: Sequence[str] = ("pool",), patches: dict | None = None
               ) -> dict[str, np.ndarray]:
    """[k, C, H, W] uint8 -> {tap: rows}: ``pool`` and ``local`` [k, F, D] float32, ``patches`` [k, rows,
    columns, D] float16 (unflipped only; ``patches`` are its parameters).

    The forward pass always holds ``forward_batch`` inputs (k x F flip variants x tiles, then zero padding): a
    CPU convolution's rounding can depend on the batch size, and an image's features must not depend on how
    many images shared its batch."""
    k, n_flips = x.shape[0], len(flips)
    variants = _flip_variants(x, flips)
    if tiles is not None:
        variants = tiles.split(variants)
    n = len(variants)
    if n < forward_batch:
        variants = torch.cat([variants, variants.new_zeros((forward_batch - n, *variants.shape[1:]))])
    out = run(variants)
    pooled, local_map = (out[0][:n], out[1][:n]) if isinstance(out, tuple) else (out[:n], None)
    if tiles is not None:
        pooled = tiles.combine_pooled(pooled)
        local_map = tiles.stitch(local_map, 8) if local_map is not None else None
    result = {"pool": pooled.reshape(k, n_flips, -1).numpy()}
    if "local" in taps:
        result["local"] = local_statistics(local_map).reshape(k, n_flips, -1).numpy()
    if "patches" in taps:
        unflipped = local_map.reshape(k, n_flips, *local_map.shape[1:])[:, 0]
        result["patches"] = patch_maps(unflipped, patches)
    return result
