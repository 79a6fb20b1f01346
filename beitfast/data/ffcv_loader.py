"""The FFCV backend (`data.backend: ffcv`): FFCV's compiled pipeline over a .beton written from
a token cache by data_prep/cache_to_ffcv.py.

The .beton has one field, `sample` (`ViewSampleField`): per image its cache index, upright
size, and one blob [view table (K, VIEW_FLOATS) float32 | tokens (K, h*w) uint16 | JPEG
bytes]. The view table holds each stored view's crop box, flip and its three jitter slots
(views.jitter_matrices). Outputs, all read from that field by our decoders:

    images   ViewImageDecoder: the STORED view, not FFCV's own random crop: libjpeg-turbo
             decode (accurate IDCT, as Pillow) -> crop box -> jitter (per pixel, as Pillow) ->
             Pillow's bicubic / Lanczos in Numba (resample.py, bit-exact with Pillow) ->
             flip -> normalise; view `pick_view(seed, epoch, index, K)`
    tokens   ViewTokensDecoder: the same view's cached tokens
    mask     the index, then masking.ffcv_mask_op (the blockwise masks of (seed, epoch, index))
    index    the cache index

Order: our StepSampler (FFCV's sample ids are cache indices), set as FFCV's traversal order.
The epoch decides the view, and FFCV's decoders are compiled code that freezes the values it
closes over. FFCV's own answer, `recompile=True`, recompiles its whole parallel pipeline every
epoch: measured about 10 s an epoch on 2 cores. Instead the decoders read the epoch at run
time from a one-element array the loader owns (`_read_cell`, a load from its address), so the
pipeline is compiled once.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from beitfast.data.cache import CacheError, TokenCache
from beitfast.data.resample import BICUBIC, LANCZOS, jitter_into, resize
from beitfast.data.sampler import StepSampler
from beitfast.jit import njit

VIEW_FLOATS = 5 + 36  # y, x, h, w, flip, then 3 jitter slots of (3, 4)
FORMAT = "beitfast-ffcv/1"

try:
    from ffcv.fields.base import ARG_TYPE, Field
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.traversal_order.base import TraversalOrder
except ImportError:  # FFCV is optional: the backend reports why it is unavailable
    Field = Operation = TraversalOrder = object


def _repair_ffcv_reader_type() -> None:
    """FFCV 1.0.2's OSCacheManager.state_type does `nb.uint8[::1].mutable = False`: it changes
    Numba's one shared uint8[::1] type object in place, so every signature compiled with it
    before hashes differently afterwards and Numba's overload tables break (a KeyError the next
    time anything compiled for uint8 arrays is compiled again: DALI's mask operator, for one).
    Build a separate read-only type instead; FFCV's reader then returns read-only views, as it
    meant to."""
    import numba as nb
    from ffcv.memory_managers.os_cache import OSCacheManager

    if getattr(OSCacheManager, "_beitfast_repaired", False):
        return
    ro = nb.types.Array(nb.uint8, 1, "C", readonly=True)

    def state_type(self):
        return nb.types.Tuple([ro, nb.uint64[::1], nb.uint64[::1]])

    def compile_reader(self):
        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address:address + size]

        return Compiler.compile(read, ro(nb.uint64, self.state_type))

    OSCacheManager.state_type = property(state_type)
    OSCacheManager.compile_reader = compile_reader
    OSCacheManager._beitfast_repaired = True


def ffcv_unavailable() -> str | None:
    """Why FFCV cannot be used here, or None."""
    import sys

    marker = Path(sys.prefix) / "ffcv-unavailable.txt"
    if marker.exists():
        return "FFCV unavailable: " + marker.read_text().strip()
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        return f"FFCV not importable: {e}"
    return None


def view_table(views: np.ndarray) -> np.ndarray:
    """float32 (K, VIEW_FLOATS): crop box, flip and jitter slots of each stored view."""
    from beitfast.data.views import jitter_matrices

    out = np.zeros((len(views), VIEW_FLOATS), np.float32)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = views["y"], views["x"], views["h"], views["w"]
    out[:, 4] = views["flip"]
    out[:, 5:] = jitter_matrices(views).reshape(len(views), 36)
    return out


class ViewSampleField(Field):
    """One cached image: index, size and blob (see the module docstring)."""

    def __init__(self, views: int, tokens: int):
        self.views, self.tokens = views, tokens

    @property
    def metadata_type(self) -> np.dtype:
        return np.dtype([("ptr", "<u8"), ("size", "<u8"), ("index", "<i8"), ("height", "<i4"), ("width", "<i4")])

    @staticmethod
    def from_binary(binary) -> "ViewSampleField":
        k, t = np.frombuffer(binary.tobytes()[:8], "<i4")
        return ViewSampleField(int(k), int(t))

    def to_binary(self):
        out = np.zeros(1, dtype=ARG_TYPE)[0]
        out[0][:8] = np.frombuffer(np.array([self.views, self.tokens], "<i4").tobytes(), np.uint8)
        return out

    def encode(self, destination, value, malloc):
        index, height, width, table, tokens, jpeg = value
        blob = np.concatenate([table.view(np.uint8).ravel(), tokens.view(np.uint8).ravel(), jpeg])
        ptr, buffer = malloc(blob.size)
        buffer[:] = blob
        destination["ptr"], destination["size"] = ptr, blob.size
        destination["index"], destination["height"], destination["width"] = index, height, width

    def get_decoder_class(self):
        return IndexDecoder


@njit
def pick_view_nb(index: int, seed: int, epoch: int, k: int) -> int:
    """views.pick_view in Numba (the same hash, bit for bit)."""
    m = np.uint64(0xFFFFFFFFFFFFFFFF)
    s = (np.uint64(seed) * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(epoch) * np.uint64(0x94D049BB133111EB)) & m
    z = (np.uint64(index) * np.uint64(0x9E3779B97F4A7C15)) ^ s
    z = (z ^ (z >> np.uint64(31))) * np.uint64(0xD6E8FEB86659FD93)
    z ^= z >> np.uint64(32)
    return int(z % np.uint64(k))


def _turbojpeg():
    """libjpeg-turbo's TurboJPEG API (FFCV links it), called from compiled code through ctypes.
    FFCV's own decoder uses the fast, less accurate IDCT; this one decodes as Pillow does (the
    accurate IDCT, fancy upsampling), so FFCV's pixels equal the reference's before resizing."""
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0")
    init, dec, destroy = lib.tjInitDecompress, lib.tjDecompress2, lib.tjDestroy
    init.restype, init.argtypes = ctypes.c_void_p, []
    dec.restype = ctypes.c_int
    dec.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                    ctypes.c_int, ctypes.c_int, ctypes.c_int]
    destroy.restype, destroy.argtypes = ctypes.c_int, [ctypes.c_void_p]

    @njit(nogil=True, cache=False)  # ctypes function pointers cannot be cached to disk
    def decode_rgb(src, dst, h, w) -> int:
        """JPEG bytes -> RGB into dst (h, w, 3); 0 on success. A handle per call: handles are
        not thread-safe, and creating one costs microseconds against a decode's milliseconds."""
        handle = init()
        r = dec(handle, src.ctypes.data, src.size, dst.ctypes.data, w, 0, h, 0, 0)  # TJPF_RGB, accurate IDCT
        destroy(handle)
        return r

    return decode_rgb


@njit
def render_view(image: np.ndarray, row: np.ndarray, size: int, kind: int) -> np.ndarray:
    """uint8 (H, W, 3) decoded image + one view-table row -> uint8 (size, size, 3)."""
    y, x, h, w = int(row[0]), int(row[1]), int(row[2]), int(row[3])
    crop = image[y:y + h, x:x + w].copy()
    jitter_into(crop, crop, row[5:].copy().reshape(3, 3, 4))
    out = resize(crop, size, size, kind)
    if row[4] != 0:
        out = out[:, ::-1].copy()
    return out


def _read_cell():
    """A Numba intrinsic: the int64 at an address (an integer). Compiled code cannot see later
    writes to an array it closes over (Numba freezes it); a load from the array's address can."""
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def read(typingctx, address):
        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))
            return builder.load(ptr)

        return types.int64(types.intp), codegen

    return read


class _Decoder(Operation):
    """Common part of our decoders: the sample's blob and its view for this epoch, read from
    `epoch_cell` (int64 (1,), owned by the loader) when a batch is decoded."""

    def __init__(self, seed: int, views: int, tokens: int, epoch_cell: np.ndarray):
        super().__init__()
        self.seed, self.views, self.tokens, self.epoch_cell = seed, views, tokens, epoch_cell


class ViewImageDecoder(_Decoder):
    def __init__(self, seed, views, tokens, epoch_cell, size: int, interp: str, normalize):
        super().__init__(seed, views, tokens, epoch_cell)
        self.size, self.kind, self.normalize = size, {"cubic": BICUBIC, "lanczos": LANCZOS}[interp], normalize

    def declare_state_and_memory(self, previous_state):
        self.max_pixels = np.uint64(int(self.metadata["height"].max()) * int(self.metadata["width"].max()) * 3)
        dtype = np.dtype("<f4") if self.normalize is not None else np.dtype("<u1")
        shape = (self.size, self.size, 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                (AllocationQuery(shape, dtype), AllocationQuery((self.max_pixels,), np.dtype("<u1"))))

    def generate_code(self):
        mem_read, my_range, decode_rgb, read = self.memory_read, Compiler.get_iterator(), _turbojpeg(), _read_cell()
        seed, cell, k, size, kind = self.seed, self.epoch_cell.ctypes.data, self.views, self.size, self.kind
        table_bytes = k * VIEW_FLOATS * 4
        jpeg_at = table_bytes + k * self.tokens * 2
        norm = self.normalize is not None
        mean = np.array(self.normalize[0] if norm else (0, 0, 0), np.float32) * 255
        std = np.array(self.normalize[1] if norm else (1, 1, 1), np.float32) * 255

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            failed = np.zeros(len(batch_indices), np.uint8)  # no raise inside the parallel loop
            epoch = read(cell)
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                blob = mem_read(field["ptr"], storage_state)
                v = pick_view_nb(field["index"], seed, epoch, k)
                row = blob[v * VIEW_FLOATS * 4:(v + 1) * VIEW_FLOATS * 4].copy().view(np.float32)
                h, w = np.uint32(field["height"]), np.uint32(field["width"])
                temp = temp_storage[i][:h * w * 3].reshape(h, w, 3)
                if decode_rgb(blob[jpeg_at:], temp, h, w) != 0:
                    failed[i] = 1
                    continue
                out = render_view(temp, row, size, kind)
                if norm:
                    for c in range(3):
                        destination[i, :, :, c] = (out[:, :, c].astype(np.float32) - mean[c]) / std[c]
                else:
                    destination[i] = out
            if failed.any():
                raise ValueError("a cached JPEG cannot be decoded")
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class ViewTokensDecoder(_Decoder):
    def declare_state_and_memory(self, previous_state):
        shape = (self.tokens,)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<i8")), \
            AllocationQuery(shape, np.dtype("<i8"))

    def generate_code(self):
        mem_read, my_range, read = self.memory_read, Compiler.get_iterator(), _read_cell()
        seed, cell, k, hw = self.seed, self.epoch_cell.ctypes.data, self.views, self.tokens
        at = k * VIEW_FLOATS * 4

        def decode(batch_indices, destination, metadata, storage_state):
            epoch = read(cell)
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                blob = mem_read(field["ptr"], storage_state)
                v = pick_view_nb(field["index"], seed, epoch, k)
                toks = blob[at + v * hw * 2:at + (v + 1) * hw * 2].copy().view(np.uint16)
                for t in range(hw):
                    destination[i, t] = toks[t]
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class IndexDecoder(Operation):
    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True, shape=(), dtype=np.dtype("<i8")), \
            AllocationQuery((), np.dtype("<i8"))

    def generate_code(self):
        def decode(batch_indices, destination, metadata, storage_state):
            for i in range(len(batch_indices)):
                destination[i] = metadata[batch_indices[i]]["index"]
            return destination[:len(batch_indices)]

        return decode


class _Order(TraversalOrder):
    """FFCV epoch e of this loader is the sampler's epoch e0 + e (e0: where the stream starts)."""

    def __init__(self, loader, sampler: StepSampler):
        self.loader, self.sampler, self.indices, self.seed, self.distributed = loader, sampler, None, 0, False
        self.first_epoch = sampler.start_step // sampler.steps_per_epoch

    def sample_order(self, epoch: int):
        return self.sampler.epoch_order(self.first_epoch + epoch).astype(np.uint64)


def beton_path(cache: TokenCache) -> Path:
    return cache.path / "ffcv" / "cache.beton"


def check_beton(path: Path, cache: TokenCache) -> dict:
    """The sidecar written with a .beton must describe this cache; raises CacheError saying
    how to rebuild otherwise."""
    side = path.with_suffix(".json")
    if not path.exists() or not side.exists():
        raise CacheError(f"{path} does not exist: write it with python data_prep/cache_to_ffcv.py --cache {cache.path}")
    meta = json.loads(side.read_text())
    want = {"format": FORMAT, "cache_manifest_sha256": manifest_sha(cache), "images": len(cache)}
    diff = [f"{k}: file has {meta.get(k)!r}, the cache needs {v!r}" for k, v in want.items() if meta.get(k) != v]
    if diff:
        raise CacheError(f"{path} was written from another cache or version ({'; '.join(diff)}); rewrite it with "
                         f"python data_prep/cache_to_ffcv.py --cache {cache.path}")
    return meta


def manifest_sha(cache: TokenCache) -> str:
    import hashlib

    return hashlib.sha256((cache.path / "manifest.json").read_bytes()).hexdigest()


_THREAD_ERRORS: dict = {}


def _record_thread_errors() -> None:
    """FFCV's epoch thread dies silently when a batch raises, and its consumer then waits for
    ever; keep the exception so the consumer can raise it instead."""
    import threading

    if getattr(threading.excepthook, "_beitfast", False):
        return
    previous = threading.excepthook

    def hook(args):
        _THREAD_ERRORS[args.thread] = args.exc_value
        previous(args)

    hook._beitfast = True
    threading.excepthook = hook


def _next_or_raise(it, poll: float = 1.0):
    """The next batch of an FFCV EpochIterator, None at the end of the epoch; raises the epoch
    thread's exception if it died (FFCV's own __next__ would block for ever)."""
    import queue

    while True:
        try:
            item = it.output_queue.get(timeout=poll)
            break
        except queue.Empty:
            if not it.is_alive() and it.output_queue.empty():
                err = _THREAD_ERRORS.pop(it, None)
                raise RuntimeError(f"FFCV's loader thread stopped: {type(err).__name__}: {err}") from err
    if item is None:
        it.close()
        return None
    slot, result = item
    if torch.cuda.is_available():  # as FFCV's __next__: wait for the batch's copy stream
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return result


class FfcvLoader:
    def __init__(self, cache: TokenCache, cfg, sampler: StepSampler, device: torch.device, threads: int,
                 view: str = "vit"):
        why = ffcv_unavailable()
        if why:
            raise CacheError(f"data.backend=ffcv: {why}")
        _repair_ffcv_reader_type()
        _record_thread_errors()
        self.cache, self.cfg, self.sampler, self.device, self.threads, self.view = cache, cfg, sampler, device, \
            threads, view
        self.path = beton_path(cache)
        check_beton(self.path, cache)
        self.grid = cfg.model.img_size // cfg.model.patch_size
        self._epoch_iter = None

    def _loader(self):
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        from beitfast.data.render import image_dtype, render_args
        from beitfast.masking import MaskSpec, ffcv_mask_op

        k, hw = self.cache.views_per_image, self.grid * self.grid
        args = render_args(self.cfg, self.view)
        self.epoch_cell = np.zeros(1, np.int64)  # the decoders read it; it must outlive them
        self.decoders = [ViewImageDecoder(self.cfg.train.seed, k, hw, self.epoch_cell, **args),
                         ViewTokensDecoder(self.cfg.train.seed, k, hw, self.epoch_cell)]
        self.mask_op = ffcv_mask_op(MaskSpec.from_config(self.cfg.mask, self.grid), self.cfg.mask.seed)
        cuda = self.device.type == "cuda"
        to_dev = [ToDevice(self.device, non_blocking=True)] if cuda else []
        pipelines = {
            "images": PipelineSpec("sample", self.decoders[0], [ToTensor(), ToTorchImage(channels_last=False), *to_dev]),
            "tokens": PipelineSpec("sample", self.decoders[1], [ToTensor(), *to_dev]),
            "mask": PipelineSpec("sample", IndexDecoder(), [self.mask_op, ToTensor(), *to_dev]),
            "index": PipelineSpec("sample", IndexDecoder(), [ToTensor()]),
            "sample": None}
        loader = Loader(str(self.path), batch_size=self.sampler.batch, num_workers=self.threads, os_cache=True,
                        order=OrderOption.SEQUENTIAL, pipelines=pipelines, custom_fields={"sample": ViewSampleField},
                        drop_last=True, batches_ahead=max(1, self.cfg.data.prefetch))
        loader.traversal_order = _Order(loader, self.sampler)
        # FFCV sizes every epoch like its first: make that a full one
        loader.first_traversal_order = np.zeros(self.sampler.steps_per_epoch * self.sampler.accum * self.sampler.batch)
        self.image_dtype = image_dtype(self.cfg) if self.view == "vit" else torch.uint8
        return loader

    def stream(self, start_step: int = 0):
        from beitfast.data.render import render_error

        self.sampler.start_step = start_step
        loader = self._loader()
        epoch = start_step // self.sampler.steps_per_epoch
        try:
            while True:
                # the previous epoch's batches are all decoded: its thread has ended
                self.epoch_cell[0] = epoch
                self.mask_op.epoch = epoch
                self._epoch_iter = iter(loader)
                while True:
                    try:
                        batch = _next_or_raise(self._epoch_iter)
                    except Exception as e:  # name the damaged image when there is one
                        raise render_error(self.cache, self.sampler.epoch_order(epoch), e) from e
                    if batch is None:
                        break
                    images, tokens, mask, index = batch
                    # FFCV's buffers come back batches_ahead + 2 batches later: the batch we yield is
                    # our own copy, made on torch's stream (FFCV's __next__ made it wait for the
                    # transfer), so it stays valid however long the caller keeps it
                    yield {"images": images.to(self.image_dtype, copy=True),
                           "tokens": tokens.view(-1, self.grid, self.grid).clone(), "mask": mask.clone(),
                           "index": index.view(-1).clone()}
                epoch += 1
        finally:
            self.close()

    def close(self) -> None:
        """Stop FFCV's epoch thread and wait for it (a thread still running compiled code at
        interpreter exit aborts the process)."""
        it, self._epoch_iter = self._epoch_iter, None
        if it is not None:
            it.close()
            it.join(timeout=120)  # it stops at its next queue check, after at most batches_ahead batches
