"""What Tensor.backward (tensor.py) walks: the graph's nodes in order, and the offer of the gradients already
pending at an op's inputs to a backward that can add them into its own (a class's sums_pending: LayerNorm's CUDA
kernel adds the residual stream's gradient into dx, so the autograd's separate add goes).
"""


def topological_order(root):
    """Nodes reachable from root that need gradients, each after all of its inputs (iterative DFS)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if node._ctx is not None:
            for parent in getattr(node._ctx, "parents", ()):
                if parent is not None and id(parent) not in visited:
                    stack.append((parent, False))
    return order


def backward_offering(ctx, dout, grads):
    """(ctx's backward's gradients, the inputs whose gradient it returned summed with the pending one): the backward
    is offered ctx.pending = {i: the gradient already pending at input i} for the inputs its class names in
    sums_pending (tensor.Function) that have one and appear once among the op's inputs; taking one (pop) says so."""
    ctx.pending = {i: grads[id(p)] for i in ctx.sums_pending if (p := ctx.parents[i]) is not None
                   and id(p) in grads and sum(q is p for q in ctx.parents) == 1}
    offered = tuple(ctx.pending)
    try:
        return ctx.backward_fn(ctx, dout), [i for i in offered if i not in ctx.pending]
    finally:
        ctx.__dict__.pop("pending", None)   # retain_graph keeps ctx, not these arrays; a backward's own error stands
