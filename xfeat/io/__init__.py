"""Files in and out: datasets (folder layout, CSV manifest), images at their true depth, atomic writes, hashing."""

from xfeat.io.atomic import atomic_write, replacing, write_bytes, write_text
from xfeat.io.dataset import Dataset, ImageRecord, Skipped, find_images, image_files, parse_label, warn_leaks
from xfeat.io.hashing import file_sha256
from xfeat.io.images import decode_image, load_image, load_native, read_image
from xfeat.io.jsonable import plain
from xfeat.io.manifest import ManifestRow, manifest_path, read_manifest
from xfeat.io.parallel import map_chunks, resolve_jobs

__all__ = ["atomic_write", "replacing", "write_bytes", "write_text", "Dataset", "ImageRecord", "Skipped",
           "find_images", "image_files", "parse_label", "warn_leaks", "file_sha256", "decode_image", "load_image",
           "load_native", "read_image", "plain", "ManifestRow", "manifest_path", "read_manifest", "map_chunks", "resolve_jobs"]
