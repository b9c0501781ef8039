"""safetensors files read without trusting them: headers parsed and checked before any tensor is allocated,
tensor bytes read either memory-mapped (CPU targets) or in large sequential chunks through pinned staging
buffers (CUDA targets), so a disk read of chunk i+1 overlaps the host-to-device copy of chunk i. Each chunk
is read by several threads at once (pread of adjacent slices, GIL released): an NVMe drive serves parallel
requests faster than one sequential stream, and from the page cache one thread's memcpy is the limit.

The format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}
(offsets relative to the byte after the header), then the raw little-endian tensor data.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, truncated, corrupt or not matching the model."""


def _dtype_table() -> dict[str, torch.dtype]:
    names = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
    }
    # Only the dtypes this torch build has; anything else is reported as unsupported by name.
    return {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}


DTYPES = _dtype_table()
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers, transformers


@dataclass(frozen=True)
class TensorInfo:
    name: str  # key as stored in the file
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header: {key: TensorInfo}, metadata. Reads only the header bytes.

    Raises CheckpointError naming the file for a missing, truncated or corrupt file, or an unsupported dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base, data_size = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, h in header.items():
        try:
            code, shape, (begin, end) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {key!r}: {h!r}") from None
        if code not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {code}, which this torch build ({torch.__version__}) "
                f"cannot hold; supported: {', '.join(DTYPES)}"
            )
        dtype = DTYPES[code]
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt header entry for {key!r}: {end - begin} bytes for {code}{list(shape)}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {key!r} ends at byte {base + end}, the file has {size} "
                "bytes (an interrupted download? delete the file and download it again)"
            )
        out[key] = TensorInfo(key, path, dtype, shape, base + begin, base + end)
    return out, meta


def find_weight_files(source: str | os.PathLike | list) -> tuple[list[Path], Path | None]:
    """The safetensors files of a component: (files, index file or None).

    `source` is a component folder, one `.safetensors` file, an `*.safetensors.index.json`, or a list of
    `.safetensors` files. A folder is searched for the diffusers name, then the transformers name, sharded
    (index) before single.
    """
    if isinstance(source, list | tuple):
        return [Path(p) for p in source], None
    path = Path(source)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _index_files(path), path
        return [path], None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    for stem in WEIGHT_NAMES:
        index = path / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _index_files(index), index
        single = path / f"{stem}.safetensors"
        if single.is_file():
            return [single], None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    singles = sorted(path.glob("*.safetensors"))
    if len(indexes) == 1:
        return _index_files(indexes[0]), indexes[0]
    if len(singles) == 1 and not indexes:
        return singles, None
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
    hint = (
        f"; found {', '.join(others)}, which dit_rt does not load (convert to safetensors)" if others else ""
    )
    if len(singles) > 1 or len(indexes) > 1:
        hint = f"; several candidates ({', '.join(p.name for p in indexes + singles)}): pass the files"
    raise CheckpointError(
        f"{path}: no weights found (expected {WEIGHT_NAMES[0]}.safetensors, {WEIGHT_NAMES[1]}.safetensors "
        f"or a *.safetensors.index.json){hint}"
    )


def read_index(index: Path) -> dict[str, str]:
    """`weight_map` of a sharded checkpoint: {key: shard file name}."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt shard index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: corrupt shard index (weight_map is not an object)")
    return weight_map


def _index_files(index: Path) -> list[Path]:
    names = sorted(set(read_index(index).values()))
    files = [index.parent / n for n in names]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: missing shard(s) {', '.join(missing)} in {index.parent} (an interrupted download? "
            "run the download again)"
        )
    return files


def scan(files: list[Path], index: Path | None) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint, {key: TensorInfo}, headers validated. With an index, the index decides
    which shard holds each key, and a key the index names but its shard lacks is an error."""
    headers = {p: read_header(p)[0] for p in files}
    tensors: dict[str, TensorInfo] = {}
    if index is not None:
        for key, name in read_index(index).items():
            info = headers[index.parent / name].get(key)
            if info is None:
                raise CheckpointError(f"{index}: lists {key!r} in {name}, but that shard does not hold it")
            tensors[key] = info
        return tensors
    for p, header in headers.items():
        for key, info in header.items():
            if key in tensors:
                raise CheckpointError(f"{key!r} is stored in both {tensors[key].file} and {p}")
            tensors[key] = info
    return tensors


# ------------------------------------------------------------------------------------------------ reading


def _as_tensor(blob: torch.Tensor, offset: int, info: TensorInfo) -> torch.Tensor:
    """View `info`'s bytes inside a uint8 blob as its dtype and shape (a copy only if misaligned)."""
    raw = blob[offset : offset + info.nbytes]
    if (raw.data_ptr() % info.dtype.itemsize) != 0:
        raw = raw.clone()
    return raw.view(info.dtype).view(info.shape)


def iter_mmap(path: Path, items: list[TensorInfo]) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """(info, CPU tensor) for each item, zero-copy views of a private memory map of the file.

    The views are valid only while the generator is open (the map closes with it): copy what you keep.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        # ACCESS_COPY: writable for torch.frombuffer, yet nothing can reach the file on disk.
        blob = torch.frombuffer(mm, dtype=torch.uint8)
        for info in items:
            yield info, _as_tensor(blob, info.start, info)
        del blob


class PinnedStaging:
    """Two pinned host buffers used in turn: a disk read fills one while the GPU copies from the other.
    (Unpinned where no CUDA is present, which only tests use.)"""

    def __init__(self, nbytes: int, slots: int = 2):
        self.pin = torch.cuda.is_available()
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin) for _ in range(slots)]
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.turn = 0

    @property
    def nbytes(self) -> int:
        return self.buffers[0].numel()

    def next(self) -> tuple[int, torch.Tensor]:
        i = self.turn
        self.turn = (i + 1) % len(self.buffers)
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy that last read this buffer has finished
        return i, self.buffers[i]


def _chunks(items: list[TensorInfo], limit: int) -> Iterator[list[TensorInfo]]:
    """Runs of tensors that are contiguous in the file and fit `limit` bytes (one tensor may exceed it)."""
    run: list[TensorInfo] = []
    for info in items:
        if run and (info.start != run[-1].end or info.end - run[0].start > limit):
            yield run
            run = []
        run.append(info)
    if run:
        yield run


READ_THREADS = 8
READ_SLICE_MIN = 8 << 20  # bytes: below this a chunk is not split further
_readers: ThreadPoolExecutor | None = None


def _read_slice(fd: int, view: memoryview, offset: int) -> int:
    """pread until view is full or the file ends; returns the bytes read."""
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if not k:
            break
        got += k
    return got


def read_exact(path: Path, fd: int, view: memoryview, offset: int) -> None:
    """Fill view with the file's bytes from offset, in parallel slices; a short file is a CheckpointError."""
    global _readers
    n = len(view)
    pieces = max(1, min(READ_THREADS, n // READ_SLICE_MIN))
    if pieces == 1:
        got = [_read_slice(fd, view, offset)]
        bounds = [(0, n)]
    else:
        if _readers is None:
            _readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dit_rt-read")
        step = -(-n // pieces)
        bounds = [(a, min(a + step, n)) for a in range(0, n, step)]
        got = list(_readers.map(lambda b: _read_slice(fd, view[b[0] : b[1]], offset + b[0]), bounds))
    for (a, b), k in zip(bounds, got):
        if k < b - a:
            raise CheckpointError(f"{path}: truncated file (read stopped at byte {offset + a + k})")


def _writable_view(buf: torch.Tensor, n: int) -> memoryview:
    """The first n bytes of a contiguous CPU uint8 tensor as a writable memoryview (no numpy: a core install
    has none). The tensor must outlive the view."""
    return memoryview((ctypes.c_char * n).from_address(buf.data_ptr())).cast("B")


def iter_staged(
    path: Path, items: list[TensorInfo], device: torch.device, staging: PinnedStaging
) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """(info, tensor on `device` in the stored dtype) per item, read in large sequential chunks.

    Each chunk: file -> pinned buffer (parallel blocking reads, GIL released) -> device blob (async copy on
    the current stream). Consumers enqueue their casts/copies on the same stream, so they are ordered after
    the copy, and the blob returns to the caching allocator only after them.
    """
    with open(path, "rb", buffering=0) as f:
        for run in _chunks(items, staging.nbytes):
            start, n = run[0].start, run[-1].end - run[0].start
            slot, buf = staging.next()
            if n > buf.numel():  # one tensor larger than the staging buffer: a one-off pinned buffer
                buf = torch.empty(n, dtype=torch.uint8, pin_memory=staging.pin)
            read_exact(path, f.fileno(), _writable_view(buf, n), start)
            blob = torch.empty(n, dtype=torch.uint8, device=device)
            blob.copy_(buf[:n], non_blocking=True)
            if device.type == "cuda":
                if buf is staging.buffers[slot]:
                    staging.events[slot] = torch.cuda.Event()
                    staging.events[slot].record(torch.cuda.current_stream(device))
                else:
                    torch.cuda.current_stream(device).synchronize()  # the one-off buffer dies here
            for info in run:
                yield info, _as_tensor(blob, info.start - start, info)
