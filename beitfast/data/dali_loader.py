"""The DALI backend (`data.backend: dali`): one pipelined DALI graph per rank.

The graph, top to bottom (`training_pipeline`):

    CacheSource          per-batch callback, run by `data.workers` Python worker processes:
                         micro-batch t of the rank's stream -> jpeg bytes, crop box, flip,
                         jitter slots, tokens, index (read from the memory-mapped cache) and the
                         blockwise masks (MaskGenerator's Numba code, in the worker's thread)
    dali_view            ROI decode (CPU: libjpeg-turbo; GPU: nvJPEG 'mixed' with the hardware
                         engine, `data.hw_decoder_load`) -> jitter -> resize -> flip ->
                         normalise straight to the training dtype (fp16 for bf16/fp16 runs,
                         fp32 otherwise), CHW
    .gpu()               tokens and masks join the images on the GPU

The masks come with the source, not from a DALI Numba operator: DALI compiles such an
operator's C callback each time a pipeline is made (about 4 s an operator on this project's
CPUs, for every rank of every run). The CPU graph's jitter is still one (views.dali_jitter:
its pixels are the FFCV backend's); the GPU graph's is coord_transform ops, nothing compiled.

Executed asynchronously and pipelined (`exec_async`, `exec_pipelined`) with a prefetch queue
of `data.prefetch` (>= 2) batches. DALI 2.4 then runs its dynamic executor, whose outputs are
reference-counted buffers of DALI's own pools (DALIGenericIterator would hand out zero-copy
`from_dlpack` views of them and ask for them with a host wait on DALI's stream). The hand-off
here (`DaliLoader.stream`) is safe by construction instead:

    share_outputs(torch's current stream)   the outputs are made ready on the stream the step
                                            runs on (an event wait on the GPU, no host wait)
    GPU outputs: a copy on that stream      the batch we yield is torch's memory, ordered and
                                            freed by torch's allocator like any tensor
    the DALI views held until an event      recorded after the copies: DALI cannot reuse a
                                            buffer a queued copy still reads
    CPU outputs: DALI's buffers as they are reference-counted: alive while the batch is

The index stays on the CPU.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from beitfast.data.cache import TokenCache
from beitfast.data.sampler import StepSampler
from beitfast.data.views import dali_view, pick_view, view_inputs
from beitfast.masking import MaskGenerator, MaskSpec

OUTPUTS = ("images", "tokens", "mask", "index")


class CacheSource:
    """The external source's callback, one call per micro-batch: micro-batch t of this rank's
    stream -> per-sample lists of jpeg bytes, crop start and shape, flip, jitter slots, tokens,
    mask and index, read from the memory-mapped cache (the masks: MaskGenerator of (mask seed,
    epoch, index), serial in the calling thread, which is a worker process or DALI's feeding
    thread, never Numba's pool the trainer may be using). Stateless in DALI's sense (the output
    for t depends on t alone; the open cache and the epoch's permutation are caches each worker
    process rebuilds), so DALI may run it in any worker. One call a batch rather than a sample:
    DALI's own per-sample calling cost on the feeding thread was what two cores lacked."""

    def __init__(self, cache_path: str, sampler: StepSampler, seed: int, spec: MaskSpec, mask_seed: int):
        self.cache_path, self.sampler, self.seed = str(cache_path), sampler, seed
        self.masks = MaskGenerator(spec, mask_seed, parallel=False)
        self._cache = None

    def __getstate__(self):  # workers reopen the memory maps themselves
        return {**self.__dict__, "_cache": None}

    def __call__(self, info):
        if self._cache is None:
            self._cache = TokenCache(self.cache_path)
        c = self._cache
        epoch, idx = self.sampler.micro_batch(info.iteration)  # the stream never ends: one DALI "epoch"
        which = pick_view(self.seed, epoch, idx, c.views_per_image)
        items = [c.item(int(j)) for j in idx]
        views = np.array([it[2][v] for it, v in zip(items, which)])
        inp = view_inputs(views)
        return ([np.asarray(it[0]) for it in items], inp["start"], inp["shape"], inp["flip"], inp["mats"],
                [np.asarray(it[3][v], np.int32) for it, v in zip(items, which)],
                list(self.masks(idx, epoch)), [np.array(j, np.int64) for j in idx])


def training_pipeline(source: CacheSource, *, batch: int, size: int, interp: str, gpu: bool,
                      device_id: int, threads: int, workers: int, prefetch: int, normalize, dtype,
                      hw_decoder_load: float = 0.65):
    """The rank's DALI pipeline (not yet built). normalize None gives uint8 views (the
    tokenizer's input); otherwise (mean, std) and the output `dtype`."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id if gpu else None,
                  prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True,
                  py_num_workers=max(1, workers), py_start_method="spawn")
    def pipe():
        (jpegs, start, shape, flip, mats, tokens, mask, index) = fn.external_source(
            source=source, num_outputs=8, batch=True, batch_info=True, parallel=workers > 0,
            # as deep as the pipeline's queue: DALI's default (1) keeps one of the workers busy at a time
            **({"prefetch_queue_depth": prefetch} if workers > 0 else {}),
            dtype=[types.UINT8, types.INT32, types.INT32, types.INT32, types.FLOAT, types.INT32, types.BOOL,
                   types.INT64])
        images = dali_view(jpegs, start, shape, flip, mats, size, interp, "gpu" if gpu else "cpu",
                           normalize, dtype, hw_decoder_load)
        if gpu:
            tokens, mask = tokens.gpu(), mask.gpu()
        return images, tokens, mask, index

    return pipe()


class DaliLoader:
    """The batch contract (beitfast/data/loader.py) from a pipelined DALI graph."""

    def __init__(self, cache: TokenCache, cfg, sampler: StepSampler, device: torch.device, threads: int, workers: int,
                 view: str = "vit"):
        self.cache, self.cfg, self.sampler, self.device = cache, cfg, sampler, device
        self.threads, self.workers, self.view = threads, workers, view
        self.grid = cfg.model.img_size // cfg.model.patch_size
        self._iter = self._pipe = None

    def stream(self, start_step: int = 0):
        """Micro-batches from optimizer step `start_step` on, across epochs, without end."""
        from nvidia.dali.backend import TensorListGPU

        from beitfast.data.render import pipeline_args, render_error

        self.sampler.start_step = start_step
        args = pipeline_args(self.cfg, self.view)
        prefetch = max(2, self.cfg.data.prefetch)
        source = CacheSource(self.cache.path, self.sampler, self.cfg.train.seed,
                             MaskSpec.from_config(self.cfg.mask, self.grid), self.cfg.mask.seed)
        gpu = self.device.type == "cuda"
        pipe = training_pipeline(source, batch=self.sampler.batch,
                                 gpu=gpu, device_id=self.device.index or 0, threads=self.threads,
                                 workers=self.workers, prefetch=prefetch, hw_decoder_load=self.cfg.data.hw_decoder_load,
                                 **args)
        pipe.build()
        self._pipe = pipe
        stream = torch.cuda.current_stream(self.device) if gpu else None
        held = deque()  # (DALI views, event after their copies) of batches whose copies may be queued
        t = 0
        try:
            while True:
                try:
                    if t == 0:
                        pipe.schedule_run()  # the first call fills the prefetch queue
                    outs = pipe.share_outputs(cuda_stream=stream)
                except RuntimeError as e:  # the batch that failed is one of those in the queue
                    idx = [j for k in range(t, t + prefetch + 1) for j in self.sampler.micro_batch(k)[1]]
                    raise render_error(self.cache, idx, e) from e
                views = [_gpu_view(o.as_tensor(), self.device) if isinstance(o, TensorListGPU)
                         else torch.from_dlpack(o.as_tensor()) for o in outs]
                images, tokens, mask, index = views
                tokens = tokens.long()  # a copy (int32 in DALI)
                if gpu:  # our own copies on torch's stream; DALI's buffers held until they are done
                    images, mask = images.clone(), mask.clone()
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    held.append((views, ev))
                    while held and (held[0][1].query() or len(held) > prefetch + 2):
                        held.popleft()[1].synchronize()  # done already but for a GPU that far behind
                pipe.release_outputs()  # DALI's own references: ours are the views above
                pipe.schedule_run()
                t += 1
                yield {"images": images, "tokens": tokens.view(-1, self.grid, self.grid),
                       "mask": mask.view(-1, self.grid, self.grid), "index": index.view(-1)}
        finally:
            if held:
                held[-1][1].synchronize()
            held.clear()
            self.close()

    def close(self) -> None:
        """Stop the pipeline, its threads and its worker processes now, not at interpreter exit."""
        pipe, self._pipe, self._iter = self._pipe, None, None
        if pipe is not None:
            pool = getattr(pipe, "_py_pool", None)
            pipe._shutdown()
            if pool is not None:
                pool.close()


def _gpu_view(tensor_gpu, device: torch.device) -> torch.Tensor:
    """A torch view of a DALI GPU tensor, on `device` (whose stream share_outputs bound it to)."""
    with torch.cuda.device(device):
        return torch.from_dlpack(tensor_gpu)
