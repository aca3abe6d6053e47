"""Data-parallel training over MPI ranks (CPU processes, any number of machines) or GPUs (NCCL), with ZeRO-1.

    mpiexec -n 2 python -m tinygrad_llm.train --data_dir=... --batch_size=12            # 2 CPU ranks
    mpirun -np 2 python -m tinygrad_llm.train --data_dir=... --device=cuda --zero=1      # 2 GPUs

Every rank holds the whole model. Each micro-batch is drawn by the same generator on every rank with the
global batch size K*B (K ranks, B = batch_size per rank), and rank r keeps rows [r*B, (r+1)*B); the
gradients are averaged over the ranks before clipping. So K ranks train exactly as one process with
batch K*B would, to the order of float summation.

How the pieces work:
- World: rank, size, local rank. The size comes from the variables MPI launchers set (Open MPI's
  OMPI_COMM_WORLD_SIZE, MPICH/hydra's PMI_SIZE); without them this is a world of one and mpi4py is never
  imported. With K > 1, other ranks' stdout goes to /dev/null (rank 0 alone prints), each CPU rank's BLAS
  uses the cores of its machine divided among the ranks that share them, and a GPU rank takes GPU
  number local_rank. A rank that exits before world.end() (train() calls it when it finishes, or when
  Ctrl-C stops every rank at the same iteration) calls MPI_Abort at exit, so that an error on one rank
  ends every rank at once instead of leaving them waiting in a collective.
- DataParallel: gradients are packed into a few flat buckets (parameters in reverse order, the order
  backward finishes them). tensor.leaf_grad_hook tells it when each parameter's gradient is complete;
  a full bucket is all-reduced right away with a non-blocking MPI_Iallreduce (CPU) or ncclAllReduce on a
  side stream (GPU) while backward goes on. Buckets are launched in a fixed order, the same on every rank.
- ZeRO-1 (zero=1): buckets are reduce-scattered instead; rank r owns block r of every bucket: the
  averaged gradient, AdamW's moments and the update for those elements only (about 1/K of the optimizer
  memory), then the parameters are all-gathered. The update is elementwise, so it equals the unsharded
  one; the gradient norm for clipping is summed over the shards. state_dict() gathers the full AdamW
  state (the same layout as optim.AdamW's), so a checkpoint resumes with any number of ranks.
"""
import atexit
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

from . import backend
from .data import get_batch
from .optim import AdamW, adamw_update_group, clip_grad_norm
from .tensor import leaf_grad_hook

SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
MAX_BUCKET_BYTES = 25 << 20      # buckets: at most this, at least MIN_BUCKET_BYTES, about MIN_BUCKETS of them
MIN_BUCKET_BYTES = 256 << 10
MIN_BUCKETS = 4


def launched_size():
    """The number of ranks an MPI launcher started (1 when none did), read from its variables."""
    for name in SIZE_VARIABLES:
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


_world = None


def world():
    """This process's World, made on the first call (mpi4py is imported only when K > 1)."""
    global _world
    if _world is None:
        _world = World(launched_size())
    return _world


class ConfigMismatch(ValueError):
    """The ranks were started with different configs."""


class World:
    """rank, size, local_rank, local_size and the communicators; methods are collectives when size > 1."""

    def __init__(self, size=1):
        self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
        self.comm = self.MPI = self.nccl = self.stream = None
        self.device = None
        self.clean = True        # at exit: Finalize if True, else MPI_Abort (see begin / end)
        self.cores = None
        if size == 1:
            return
        try:
            import mpi4py
        except ImportError:
            raise RuntimeError(f"started by an MPI launcher as {size} ranks, but mpi4py is not installed: "
                               "pip install -e '.[dist]'") from None
        mpi4py.rc.finalize = False    # _at_exit finalizes (a clean exit) or aborts (anything else)
        from mpi4py import MPI
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.clean = False       # a rank that exits before end() (an error anywhere) ends every rank
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        mine = sorted(_usable_cores())
        sharing = sum(other == mine for other in node.allgather(mine))   # ranks not pinned apart share cores
        self.cores = max(1, len(mine) // sharing)
        node.Free()
        atexit.register(self._at_exit)
        if self.rank:
            sys.stdout = open(os.devnull, "w")

    @property
    def is_main(self):
        return self.rank == 0

    def begin(self):
        """Mark the start of collective work: exiting before end() aborts every rank (with K > 1, a new
        World starts so: whatever the process does before its first end() counts)."""
        self.clean = False

    def end(self):
        self.clean = True

    def _at_exit(self):
        if self.MPI.Is_finalized():
            return
        if self.clean:
            self.MPI.Finalize()
        else:
            sys.stdout.flush()
            sys.stderr.write(f"rank {self.rank} of {self.size}: exiting on an error; aborting every rank\n")
            sys.stderr.flush()
            # the launcher forwards this rank's stderr through a pipe and stops reading it once Abort kills
            # the job: a moment first, so that the traceback above reaches the user (without it the error
            # line was missing from mpiexec's stderr in 2 of about 70 runs of the failing-rank test here)
            time.sleep(0.5)
            self.comm.Abort(1)

    def setup(self, device):
        """Once per process: BLAS threads per CPU rank, or this rank's GPU and the NCCL communicator."""
        if self.size == 1 or self.device == device:
            return
        if self.device is not None:
            raise RuntimeError(f"this process already trains on {self.device}; one device per run under MPI")
        self.device = device
        if device == "cpu":
            from .kernels.cpu import threads
            blas = threads.numpy_blas()
            if blas is not None:
                blas.set_num_threads(self.cores)
            threads.THREADS = max(1, min(self.cores, threads.THREADS))
            return
        cp = backend.cupy_module()
        count = cp.cuda.runtime.getDeviceCount()
        if count == 1:           # a launcher (or CUDA_VISIBLE_DEVICES) gave each rank its own GPU
            cp.cuda.Device(0).use()
        elif self.local_rank < count:
            cp.cuda.Device(self.local_rank).use()
        else:
            raise RuntimeError(f"{self.local_size} ranks on this machine but {count} GPUs: start one rank per GPU")
        from cupy.cuda import nccl
        unique_id = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self.stream = cp.cuda.Stream(non_blocking=True)

    # ---- small collectives on the host ---------------------------------------------------------
    def barrier(self):
        if self.size > 1:
            self.comm.Barrier()

    def max(self, value):
        """The largest value over ranks (a Python number)."""
        return value if self.size == 1 else self.comm.allreduce(value, op=self.MPI.MAX)

    def mean(self, value):
        """The mean over ranks of a Python number (the same float on every rank)."""
        if self.size == 1:
            return value
        return self.comm.allreduce(float(value)) / self.size

    def check_same_config(self, config):
        """Raise ValueError naming the differences when the ranks got different configs (a dict)."""
        if self.size == 1:
            return
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        if len(set(self.comm.allgather(digest))) == 1:
            return
        configs = self.comm.allgather(config)
        diffs = [f"rank {r} has {key}={other.get(key)!r} but rank 0 has {configs[0].get(key)!r}"
                 for r, other in enumerate(configs) for key in sorted(set(other) | set(configs[0]))
                 if other.get(key) != configs[0].get(key)]
        raise ConfigMismatch("the ranks were started with different configs (" + "; ".join(diffs[:6])
                         + "): give every rank the same arguments")

    def batch(self, data_dir, split, batch_size, block_size, rng):
        """This rank's rows of a global batch of batch_size * size windows drawn from rng (the same on every rank)."""
        x, y = get_batch(data_dir, split, batch_size * self.size, block_size, rng)
        if self.size == 1:
            return x, y
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return np.ascontiguousarray(x[rows]), np.ascontiguousarray(y[rows])

    def dropout_rng(self, rng, config, it, micro):
        """The generator for dropout masks: the training one in a single process; with K > 1 and dropout,
        one per (seed, iteration, micro-batch, rank), so that ranks draw different masks for their rows."""
        if self.size == 1 or not config.dropout:
            return rng
        return np.random.default_rng((config.seed, it, micro, self.rank))


def _usable_cores():
    try:
        return os.sched_getaffinity(0)
    except AttributeError:   # not Linux
        return set(range(os.cpu_count() or 1))


class _Bucket:
    """A flat buffer for the gradients of consecutive parameters, padded to a multiple of the world size."""

    def __init__(self, params, xp, dtype, size, rank):
        self.params, self.offsets, offset = params, [], 0
        for p in params:
            self.offsets.append(offset)
            offset += p.size
        self.numel = offset
        self.shard_size = -(-offset // size)
        self.flat = xp.zeros(self.shard_size * size, dtype=dtype)
        self.shard = xp.zeros(self.shard_size, dtype=dtype)      # ZeRO: this rank's block of the sum
        self.lo = rank * self.shard_size                           # this rank's block: [lo, lo + shard_size)
        self.ready = 0


class DataParallel:
    """The training step's data-parallel side: backward with gradient averaging, the norm, the optimizer.

        dp = DataParallel(world, model, zero=0)
        optimizer = dp.optimizer(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99))
        for micro in range(k):
            x, y = world.batch(...)
            dp.backward(loss / k, last=micro == k - 1)
        norm = dp.clip_grad_norm(1.0)       # averages over ranks first; the global norm before clipping
        optimizer.step(); optimizer.zero_grad()

    With one rank and zero=0 every method is the plain single-process operation.
    """

    def __init__(self, world, model, zero=0, bucket_bytes=None, overlap=True):
        if zero not in (0, 1):
            raise ValueError(f"zero must be 0 or 1, got {zero!r}")
        self.world, self.model, self.zero, self.overlap = world, model, zero, overlap
        self.params = model.parameters()
        self.active = world.size > 1 or zero
        self.comm_wait_s = 0.0      # time spent waiting for communication after backward (exposed)
        self.buckets = []
        if not self.active:
            return
        xp = backend.array_module(self.params[0].data)
        dtype = self.params[0].dtype
        self.gpu = xp is not np
        total = sum(p.size for p in self.params) * dtype.itemsize
        cap = bucket_bytes or min(MAX_BUCKET_BYTES, max(MIN_BUCKET_BYTES, total // MIN_BUCKETS))
        group, nbytes = [], 0
        for p in reversed(self.params):
            if p.dtype != dtype:
                raise TypeError(f"data-parallel training needs one dtype for all parameters, got {dtype} and {p.dtype}")
            if group and nbytes + p.size * dtype.itemsize > cap:
                self.buckets.append(_Bucket(group, xp, dtype, world.size, world.rank))
                group, nbytes = [], 0
            group.append(p)
            nbytes += p.size * dtype.itemsize
        self.buckets.append(_Bucket(group, xp, dtype, world.size, world.rank))
        self.slots = {}
        for index, bucket in enumerate(self.buckets):
            for p, offset in zip(bucket.params, bucket.offsets):
                self.slots[id(p)] = (index, bucket.flat[offset:offset + p.size].reshape(p.shape))
        self.requests, self.launched, self.pending = [], 0, False

    # ---- backward with the all-reduce overlapped -----------------------------------------------
    def backward(self, loss, last=True):
        """loss.backward(); on the last micro-batch of a step, the buckets are reduced as they fill."""
        if not (self.active and last):
            loss.backward()
            return
        for bucket in self.buckets:
            bucket.ready = 0
        self.launched, self.requests, self.pending, self.seen = 0, [], True, set()
        with leaf_grad_hook(self._on_grad if self.overlap else None):
            loss.backward()
        for bucket in self.buckets:          # parameters that got no gradient (or overlap off): fill and send
            if bucket.ready < len(bucket.params):
                for p in bucket.params:
                    if id(p) not in self.seen:
                        view = self.slots[id(p)][1]
                        if p.grad is None:
                            view.fill(0)
                        else:
                            view[...] = p.grad
                bucket.ready = len(bucket.params)
        self._launch_ready()

    def _on_grad(self, leaf, dout):
        slot = self.slots.get(id(leaf))
        if slot is None:
            return
        index, view = slot
        self.seen.add(id(leaf))
        xp = backend.array_module(view)
        if leaf.grad is None:
            view[...] = dout
        else:
            xp.add(leaf.grad, dout, out=view)     # the earlier micro-batches' sum plus this one, as backward adds
        self.buckets[index].ready += 1
        self._launch_ready()

    def _launch_ready(self):
        while self.launched < len(self.buckets) and self.buckets[self.launched].ready == len(self.buckets[self.launched].params):
            self._launch(self.buckets[self.launched])
            self.launched += 1
        if self.requests:
            self.world.MPI.Request.Testall(self.requests)    # MPICH progresses non-blocking collectives here

    def _launch(self, bucket):
        w = self.world
        if bucket.numel < bucket.flat.size:
            bucket.flat[bucket.numel:] = 0
        if w.size == 1:
            if self.zero:
                bucket.shard[...] = bucket.flat
            return
        if w.nccl is None:
            if self.zero:
                self.requests.append(w.comm.Ireduce_scatter_block(bucket.flat, bucket.shard))
            else:
                self.requests.append(w.comm.Iallreduce(w.MPI.IN_PLACE, bucket.flat))
            return
        cp = backend.cupy_module()
        from cupy.cuda import nccl
        ready = cp.cuda.Event()
        ready.record(cp.cuda.get_current_stream())
        w.stream.wait_event(ready)
        if self.zero:
            w.nccl.reduceScatter(bucket.flat.data.ptr, bucket.shard.data.ptr, bucket.shard_size,
                                 _nccl_type(bucket.flat.dtype), nccl.NCCL_SUM, w.stream.ptr)
        else:
            w.nccl.allReduce(bucket.flat.data.ptr, bucket.flat.data.ptr, bucket.flat.size,
                             _nccl_type(bucket.flat.dtype), nccl.NCCL_SUM, w.stream.ptr)

    def average_gradients(self):
        """Wait for the reductions; average; point .grad at the averaged buckets (without ZeRO)."""
        if not (self.active and self.pending):
            return
        self.pending = False
        w = self.world
        start = time.perf_counter()
        if self.requests:
            w.MPI.Request.Waitall(self.requests)
            self.requests = []
        elif w.nccl is not None:
            cp = backend.cupy_module()
            done = cp.cuda.Event()
            done.record(w.stream)
            cp.cuda.get_current_stream().wait_event(done)
        self.comm_wait_s += time.perf_counter() - start
        for bucket in self.buckets:
            if self.zero:
                if w.size > 1:
                    bucket.shard /= w.size
            else:
                bucket.flat /= w.size
        for p in self.params:
            p.grad = None if self.zero else self.slots[id(p)][1]

    # ---- norm and clipping -------------------------------------------------------------------------
    def clip_grad_norm(self, max_norm):
        """Average the gradients over ranks, then clip their global L2 norm to max_norm (0: no clipping);
        returns the norm before clipping (as optim.clip_grad_norm)."""
        self.average_gradients()
        if not self.zero:
            if max_norm:
                return clip_grad_norm(self.params, max_norm)
            return math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in self.params if p.grad is not None))
        xp = backend.array_module(self.buckets[0].shard)
        squares = xp.zeros(1, dtype=np.float64)
        for bucket in self.buckets:
            squares += xp.dot(bucket.shard, bucket.shard)
        squares = self._sum(squares)
        total = xp.sqrt(squares[0])
        if xp is np:
            total = float(total)
        if max_norm:
            coef = xp.minimum(max_norm / (total + 1e-6), 1.0)
            for bucket in self.buckets:
                bucket.shard *= coef.astype(bucket.shard.dtype) if xp is not np else bucket.shard.dtype.type(coef)
        return total

    def _sum(self, array):
        """array summed over ranks (a small host or device array)."""
        w = self.world
        if w.size == 1:
            return array
        if w.nccl is None:
            w.comm.Allreduce(w.MPI.IN_PLACE, array)
            return array
        from cupy.cuda import nccl
        cp = backend.cupy_module()
        w.nccl.allReduce(array.data.ptr, array.data.ptr, array.size, _nccl_type(array.dtype), nccl.NCCL_SUM,
                         cp.cuda.get_current_stream().ptr)
        return array

    # ---- optimizer and checkpoints -----------------------------------------------------------------
    def optimizer(self, params, **hyper):
        """optim.AdamW, or with zero=1 a ZeroAdamW that updates this rank's shard of every bucket."""
        return ZeroAdamW(params, dp=self, **hyper) if self.zero else AdamW(params, **hyper)

    def full_optimizer(self, optimizer):
        """What to hand to checkpoint.save_checkpoint on rank 0: the optimizer itself, or with ZeRO a
        stand-in holding the full state, gathered from every rank (all ranks must call this then)."""
        return _Saved(optimizer.state_dict()) if self.zero else optimizer


class _Saved:
    """An optimizer stand-in whose state_dict() is one already gathered."""

    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state


def _nccl_type(dtype):
    from cupy.cuda import nccl
    return {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
            np.dtype(np.float16): nccl.NCCL_FLOAT16}[np.dtype(dtype)]


class ZeroAdamW(AdamW):
    """AdamW sharded over ranks (ZeRO stage 1): this rank keeps exp_avg / exp_avg_sq for its block of each
    gradient bucket and updates those parameter elements; step() then all-gathers the parameters.

    Every parameter is updated at every step (its gradient, zero when none flowed, is in the buckets).
    state_dict() is a collective that returns the full state in optim.AdamW's layout; load_state_dict takes
    such a state (saved with any number of ranks, or by plain AdamW) and keeps this rank's share.
    """

    def __init__(self, params, dp, **hyper):
        super().__init__(params, **hyper)
        self.dp, self.steps = dp, 0
        group_of = {id(p): g for g, group in enumerate(self.param_groups) for p in group["params"]}
        if set(group_of) != {id(p) for p in dp.params}:
            raise ValueError("ZeroAdamW needs exactly the model's parameters, each once")
        xp = backend.array_module(dp.buckets[0].flat)
        self.exp_avg = [xp.zeros_like(b.shard) for b in dp.buckets]
        self.exp_avg_sq = [xp.zeros_like(b.shard) for b in dp.buckets]
        # segments: (group, bucket index, parameter, its flat range [a, b), the shard's range [c, d))
        self.segments = []
        for index, bucket in enumerate(dp.buckets):
            for p, offset in zip(bucket.params, bucket.offsets):
                if not p.data.flags.c_contiguous:
                    raise ValueError("ZeroAdamW needs contiguous parameter arrays")
                lo, hi = max(offset, bucket.lo), min(offset + p.size, bucket.lo + bucket.shard_size)
                if lo < hi:
                    self.segments.append((group_of[id(p)], index, p, lo - offset, hi - offset,
                                          lo - bucket.lo, hi - bucket.lo))

    def optimizer_bytes(self):
        """Bytes of AdamW state this rank holds."""
        return sum(a.nbytes for a in self.exp_avg + self.exp_avg_sq)

    def step(self):
        self.steps += 1
        buckets = self.dp.buckets
        for g, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lists = ([], [], [], [])
            for sg, index, p, a, b, c, d in self.segments:
                if sg == g:
                    for arrays, x in zip(lists, (p.data.reshape(-1)[a:b], buckets[index].shard[c:d],
                                                 self.exp_avg[index][c:d], self.exp_avg_sq[index][c:d])):
                        arrays.append(x)
            if lists[0]:
                backend.accelerated(adamw_update_group, lists[0][0])(
                    *lists, group["lr"], beta1, beta2, group["eps"], group["weight_decay"], self.steps)
        self._gather_params()

    def _gather_params(self):
        w, dp = self.dp.world, self.dp
        for bucket in dp.buckets:         # this rank's updated elements into its block of the flat buffer
            for p, offset in zip(bucket.params, bucket.offsets):
                lo, hi = max(offset, bucket.lo), min(offset + p.size, bucket.lo + bucket.shard_size)
                if lo < hi:
                    bucket.flat[lo:hi] = p.data.reshape(-1)[lo - offset:hi - offset]
        if w.size > 1:
            if w.nccl is None:
                w.MPI.Request.Waitall([w.comm.Iallgather(w.MPI.IN_PLACE, b.flat) for b in dp.buckets])
            else:
                cp = backend.cupy_module()
                stream = cp.cuda.get_current_stream().ptr
                for b in dp.buckets:
                    w.nccl.allGather(b.flat.data.ptr + b.lo * b.flat.itemsize, b.flat.data.ptr, b.shard_size,
                                     _nccl_type(b.flat.dtype), stream)
        for bucket in dp.buckets:
            for p, offset in zip(bucket.params, bucket.offsets):
                p.data.reshape(-1)[...] = bucket.flat[offset:offset + p.size]

    def _gather(self, shards):
        """The full flat buffers of per-bucket shards (all ranks' blocks)."""
        w = self.dp.world
        xp = backend.array_module(shards[0])
        full = [xp.zeros_like(b.flat) for b in self.dp.buckets]
        for f, s, b in zip(full, shards, self.dp.buckets):
            f[b.lo:b.lo + b.shard_size] = s
        if w.size > 1:
            for f in full:
                host = backend.to_device(f, "cpu")
                w.comm.Allgather(w.MPI.IN_PLACE, host)
                f[...] = backend.to_device(host, "cuda") if xp is not np else host
        return full

    def state_dict(self):
        """The full AdamW state (a collective when there are several ranks)."""
        if self.steps:
            m, v = self._gather(self.exp_avg), self._gather(self.exp_avg_sq)
            for index, bucket in enumerate(self.dp.buckets):
                for p, offset in zip(bucket.params, bucket.offsets):
                    self.state[id(p)] = {"step": self.steps,
                                         "exp_avg": m[index][offset:offset + p.size].reshape(p.shape),
                                         "exp_avg_sq": v[index][offset:offset + p.size].reshape(p.shape)}
        try:
            return super().state_dict()
        finally:
            self.state = {}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)    # checks, sets the hyperparameters, fills self.state (full)
        steps = {s["step"] for s in self.state.values()}
        if len(steps) > 1 or (self.state and len(self.state) != len(self.dp.params)):
            self.state = {}
            raise ValueError("ZeroAdamW.load_state_dict: needs one step count shared by every parameter")
        self.steps = steps.pop() if steps else 0
        for shard in self.exp_avg + self.exp_avg_sq:
            shard.fill(0)
        for _, index, p, a, b, c, d in self.segments:
            if id(p) in self.state:
                self.exp_avg[index][c:d] = self.state[id(p)]["exp_avg"].reshape(-1)[a:b]
                self.exp_avg_sq[index][c:d] = self.state[id(p)]["exp_avg_sq"].reshape(-1)[a:b]
        self.state = {}
