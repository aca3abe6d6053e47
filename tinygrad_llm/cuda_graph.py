"""The whole training step on the GPU as one CUDA graph: captured once, replayed every iteration.

    step = CudaGraphStep(model, optimizer, batch_size=64, block_size=256, grad_accum=1, grad_clip=1.0)
    for it in range(max_iters):
        batches = [get_batch(...) for _ in range(grad_accum)]       # NumPy (B, T) ids and targets
        bases = [step_seed(rng) for _ in range(grad_accum)]         # dropout's base seed of each micro-batch
        loss, norm = step(batches, bases, lr=lr_at(it))             # device scalars: nothing has waited yet
        print(float(loss))

Why: the step is hundreds of kernels; issued one by one from Python, the host's issue time exceeds the
GPU's work (TF32, small models). A graph is issued with one call, whatever the step holds.

What makes one step replayable (each point is a rule the step's code follows):
- Inputs: the ids and targets are copied into static device buffers before each replay (the host checks
  them first, on the NumPy batch: nothing in the step reads a value back).
- Learning rate and step count: AdamW's group kernel reads them from a device buffer [lr, step]
  (kernels/cuda/optim.device_schedule), written before each replay; the host's step counts advance as
  the eager step's would (checkpoints see the same state).
- Dropout: every mask hashes (the micro-batch's base seed, the call's index in the step, the element),
  the base read from device memory (kernels/cuda/runtime.device_seeds); the bases are drawn on the host
  from the run's generator, so the eager step on the GPU (train.train_step) draws the very same masks.
- GEMMs: through the project's own cuBLAS / cuBLASLt handles (kernels/cuda/cublas.py): CuPy refuses its
  cuBLAS calls during capture.
- Memory: the gradients live in kept buffers, zeroed at the start of the step (the multi-tensor tables of
  clipping and AdamW are built on the warm-up steps and reused); everything the step allocates comes
  from a memory pool of the graph's own, used by the warm-up steps and the capture alone and kept with the
  graph. A block freed during the capture is reused later in the same capture (stream order makes that
  safe), never by an array outside the graph; arrays that kernel caches made are referenced by the graph.
- No host sync inside: the loss and the gradient norm stay on the device until the caller reads them.

The first `warmup` steps run the same body eagerly (compiling kernels, building cuBLASLt plans and pointer
tables); the next is captured and launched, and every later one replays it. Streams: the graph runs on a
stream of its own, ordered after the default stream's work by an event, and the default stream waits for
it in turn, so eager code before and after (evaluation, checkpoints) sees the step's results.
Data-parallel training (several ranks) is not captured: train.py keeps it eager.
"""
import contextlib
import math
import sys

import numpy as np

from . import backend, precision
from .optim import AdamW, clip_grad_norm


def step_seed(rng):
    """The base seed of one micro-batch's dropout masks, a draw of the run's generator (as the eager GPU step)."""
    return int(rng.integers(0, 2 ** 63))


_eager_seeds = {}   # micro-batch count -> the DeviceSeeds of the eager GPU step


@contextlib.contextmanager
def dropout_scope(model, dropout, rng, micro=0, count=1):
    """The eager step's dropout on the GPU drawn as the graph's: with dropout > 0 and the model on the GPU,
    one base seed is drawn from rng (step_seed) and written to device memory, and every dropout kernel of
    the block hashes it with its call's index. Elsewhere nothing is drawn here (the ops draw from rng)."""
    if not (dropout and backend.kernels_enabled() and backend.device_of(model.parameters()[0].data) == "cuda"):
        yield
        return
    from .kernels.cuda import runtime
    seeds = _eager_seeds.get(count)
    if seeds is None:
        seeds = _eager_seeds[count] = runtime.DeviceSeeds(count)
    seeds.words[micro:micro + 1].set(np.array([step_seed(rng)], dtype=np.uint64))
    with runtime.device_seeds(seeds, micro):
        yield


class CudaGraphStep:
    """One optimizer step (grad_accum micro-batches, clipping, AdamW) captured as a CUDA graph; see the module."""

    def __init__(self, model, optimizer, batch_size, block_size, grad_accum=1, grad_clip=1.0, warmup=2):
        cp = backend.cupy_module()
        from .kernels.cuda import runtime
        if type(optimizer) is not AdamW:   # (ZeroAdamW's collectives are not captured)
            raise TypeError(f"CudaGraphStep needs an optim.AdamW optimizer, got {type(optimizer).__name__}")
        self.params = model.parameters()
        if not self.params or any(backend.device_of(p.data) != "cuda" for p in self.params):
            raise ValueError("CudaGraphStep: the model must be on the GPU (model.to('cuda')) first")
        if not backend.kernels_enabled():
            raise ValueError("CudaGraphStep needs the CUDA kernels (TINYGRAD_LLM_KERNELS=0 selects CuPy's own ops, "
                             "whose cuBLAS calls cannot be captured)")
        self.cp, self.runtime = cp, runtime
        self.model, self.optimizer = model, optimizer
        self.A, self.B, self.T = int(grad_accum), int(batch_size), int(block_size)
        self.grad_clip, self.warmup, self.calls = float(grad_clip), int(warmup), 0
        dtype = self.params[0].dtype
        # kept buffers: gradients, optimizer state, inputs, seeds, schedule, outputs (the default pool)
        for p in self.params:
            if p.grad is None or p.grad.dtype != p.dtype:
                p.grad = cp.zeros_like(p.data)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in optimizer.state:
                    optimizer.state[id(p)] = {"step": 0, "exp_avg": cp.zeros_like(p.data),
                                              "exp_avg_sq": cp.zeros_like(p.data)}
        self.x = cp.zeros((self.A, self.B, self.T), dtype=np.int64)
        self.y = cp.zeros((self.A, self.B, self.T), dtype=np.int64)
        self.seeds = runtime.DeviceSeeds(self.A)
        self.schedule = cp.zeros(3, dtype=np.float64)   # lr, step, skip (set in the graph: non-finite norm)
        self.loss = cp.zeros((), dtype=dtype)
        self.norm = cp.zeros((), dtype=dtype)
        self._skip = cp.zeros((), dtype=bool)
        self.backward_seed = cp.full((), 1.0 / self.A, dtype=dtype)   # d(loss / A) / d(loss)
        # one pinned host buffer for everything copied in before a step: x, y, seeds, schedule
        self._layout = [(self.x, self.x.nbytes), (self.y, self.y.nbytes), (self.seeds.words, self.seeds.words.nbytes),
                        (self.schedule, self.schedule.nbytes)]
        self.staging = cp.cuda.alloc_pinned_memory(sum(n for _, n in self._layout))
        self.staged = None            # an event: the last copy out of staging is done
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()   # the warm-up steps' and the graph's own
        self.graph, self.kept, self.failure = None, [], None   # failure: why the capture failed (then: eager)
        self.placeholder_rng = np.random.default_rng(0)   # dropout's argument check wants one; never drawn from

    # ---- host side ---------------------------------------------------------------------------------
    def __call__(self, batches, bases, lr):
        """Run one step on `batches` ([(x, y)] NumPy int (B, T), one a micro-batch) with dropout base seeds
        `bases` (one a micro-batch) at learning rate lr; returns the (mean loss, gradient norm before
        clipping) as device scalars, written when the step is done on the GPU."""
        cp = self.cp
        if len(batches) != self.A or len(bases) != self.A:
            raise ValueError(f"CudaGraphStep: {len(batches)} batches and {len(bases)} seeds for {self.A} micro-batches")
        for x, y in batches:
            if np.shape(x) != (self.B, self.T) or np.shape(y) != (self.B, self.T):
                raise ValueError(f"CudaGraphStep: a batch of shape {np.shape(x)}, {np.shape(y)}; the graph was made "
                                 f"for ({self.B}, {self.T})")
            self.model._check_inputs(np.asarray(x), np.asarray(y), 0)   # on the host: the step never reads back
        steps = {self.optimizer.state[id(p)]["step"] for g in self.optimizer.param_groups for p in g["params"]}
        if len(steps) != 1:
            raise ValueError(f"CudaGraphStep: the parameters are at different step counts {sorted(steps)}")
        step = steps.pop() + 1
        if self.staged is not None:
            self.staged.synchronize()    # the previous step's copies have left the staging buffer
        host = np.frombuffer(self.staging, dtype=np.uint8, count=sum(n for _, n in self._layout))
        offset = 0
        values = [np.stack([np.asarray(x, dtype=np.int64) for x, _ in batches]),
                  np.stack([np.asarray(y, dtype=np.int64) for _, y in batches]),
                  np.asarray(bases, dtype=np.uint64), np.array([lr, step, 0], dtype=np.float64)]
        for (device, n), value in zip(self._layout, values):
            host[offset:offset + n] = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
            offset += n
        # after whatever the default stream has queued (evaluation reads the weights this step changes)
        self.stream.wait_event(cp.cuda.get_current_stream().record())
        offset = 0
        for device, n in self._layout:
            cp.cuda.runtime.memcpyAsync(device.data.ptr, self.staging.ptr + offset, n,
                                        cp.cuda.runtime.memcpyHostToDevice, self.stream.ptr)
            offset += n
        self.staged = self.stream.record()
        self.model.train()
        self.optimizer.lr = lr
        if self.graph is None and self.calls >= self.warmup and self.failure is None:
            try:
                self._capture()
            except Exception as e:   # the step stays right, only slower: say so once and run it eagerly
                self.failure = f"{type(e).__name__}: {e}"
                print(f"cuda_graph: the step could not be captured ({self.failure[:300]}); it runs eagerly",
                      file=sys.stderr, flush=True)
        if self.graph is None:
            with cp.cuda.using_allocator(self.pool.malloc), self.stream:
                self._body()          # counts the optimizer's steps itself
        else:
            self.graph.launch(self.stream)
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self.optimizer.state[id(p)]["step"] += 1
        self.calls += 1
        cp.cuda.get_current_stream().wait_event(self.stream.record())
        return self.loss, self.norm

    def _capture(self):
        cp, runtime = self.cp, self.runtime
        counts = {id(p): self.optimizer.state[id(p)]["step"] for g in self.optimizer.param_groups for p in g["params"]}
        self.kept = runtime.cached_arrays()   # the caches may not drop these while the capture runs
        try:
            with cp.cuda.using_allocator(self.pool.malloc), self.stream:
                runtime.capturing = True
                self.stream.begin_capture()
                try:
                    self._body()
                except BaseException:
                    try:
                        self.stream.end_capture()
                    except Exception:
                        pass
                    raise
                finally:
                    runtime.capturing = False
                graph = self.stream.end_capture()
        finally:
            for group in self.optimizer.param_groups:   # the capture ran the body's Python, not its kernels
                for p in group["params"]:
                    self.optimizer.state[id(p)]["step"] = counts[id(p)]
        self.graph = graph
        self.kept += runtime.cached_arrays()   # tables and vectors the graph reads: alive while it is

    # ---- device side: what is captured -----------------------------------------------------------------
    def _body(self):
        """Zero the gradients, forward and backward every micro-batch, clip, AdamW: kernels only, no host sync."""
        from .kernels.cuda import grads as cuda_grads, optim as cuda_optim
        runtime, model = self.runtime, self.model
        cuda_grads.zero_arrays([p.grad for p in self.params])
        total = None
        with precision.weight_copies():   # bf16: each weight rounded once a step, inside the graph
            for micro in range(self.A):
                with runtime.device_seeds(self.seeds, micro):
                    _, loss = model._forward(self.x[micro], self.y[micro], None, self.placeholder_rng, 0)
                    # scaled by 1/A (as the eager step's loss * (1/A)): the A passes sum to the mean's gradient
                    loss.backward(gradient=self.backward_seed)
                total = loss.data if total is None else total + loss.data
        self.loss[...] = total / self.A if self.A > 1 else total
        norm = clip_grad_norm(self.params, self.grad_clip if self.grad_clip else math.inf)
        self.norm[...] = norm
        # a non-finite norm: AdamW leaves the weights as they were (the eager step stops before its update), so
        # the caller's re-run of the step on them finds the op that overflowed, not NaN weights
        self.cp.logical_not(self.cp.isfinite(self.norm), out=self._skip)
        self.schedule[2:3] = self._skip
        with cuda_optim.device_schedule(self.schedule):
            self.optimizer.step()

    def memory_bytes(self):
        """Bytes held by the graph's own pool (the step's activations and temporaries)."""
        return self.pool.total_bytes()
