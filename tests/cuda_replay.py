"""A step of kernel launches run eagerly, then captured as a CUDA graph and replayed (what the flash attention
tests check: launches only, into buffers made beforehand)."""


def eager_then_replayed(step, outputs):
    """Run step() (which writes `outputs`, CuPy arrays), keep copies, capture step() on a stream, zero the
    outputs, replay the graph once and wait: returns the eager copies (the replayed values are in `outputs`)."""
    import cupy as cp
    step()
    eager = [a.copy() for a in outputs]
    cp.cuda.Device().synchronize()   # (the capture's stream does not wait for the eager run's)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        step()
        graph = stream.end_capture()
    with stream:   # the zeros on the replay's stream: filled on another, they could land after the replay's writes
        for a in outputs:
            a.fill(0)
    graph.launch(stream)
    stream.synchronize()
    return eager
