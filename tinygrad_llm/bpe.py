"""Byte pair encoding on bytes: merging one piece by rank, and learning the ranks from counted pieces.

The algorithms under tokenizer.BPETokenizer, free of regex splitting, special tokens and files:
- `_merge_by_rank` (the readable loop), `_merge_by_rank_heap` (long pieces) and `_merge_batch_kernel`
  (many pieces at once, compiled by Numba in tokenizer._compiled_kernel) give the same ids;
- `train_ranks_reference` (the readable loop) and `_train_ranks` (the fast one) learn the same merges.
"""
import heapq
import sys
from collections import Counter, defaultdict

import numpy as np

def _replace_pair(ids, pair, new_id):
    """Replace each occurrence of `pair` in `ids` by `new_id`, scanning left to right.

    >>> _replace_pair([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    >>> _replace_pair([5, 5, 5], (5, 5), 6)   # overlapping occurrences: the leftmost wins
    [6, 5]
    """
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _merge_by_rank(piece, ranks):
    """Token ids of one piece (bytes) the way tiktoken computes them: start from single bytes, then
    repeatedly join the adjacent pair whose joined bytes have the lowest rank (the leftmost on a tie)
    until no adjacent pair joins into a known token.

    >>> _merge_by_rank(b"abcab", {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4})
    [4, 3]

    (ab at rank 3 is joined twice, then ab+c at rank 4; ab+ab is not a token.) Quadratic in the
    piece length, which the split pattern keeps short for text; a long piece (a run of one character
    is a single piece) goes to _merge_by_rank_heap, which joins the same pairs in the same order.
    """
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[part] for part in parts]


# Pieces longer than this are merged with a heap of pairs and a linked list of parts (n log n) instead
# of a scan of every pair per join (n^2): one join then costs a few heap operations, not a pass over the
# piece. Below it the scan is faster (no heap to build); a megabyte of one letter is one piece.
_HEAP_MIN_BYTES = 64


def _merge_by_rank_heap(piece, ranks):
    """_merge_by_rank in O(n log n) for a long piece: the same joins in the same order.

    A heap holds (rank, start) for every adjacent pair of parts, where start is the byte offset of the
    pair's left part; its smallest entry is the pair _merge_by_rank would join (the lowest rank, the
    leftmost on a tie). Parts are a linked list keyed by their start offset. A join changes the pairs
    on either side of the joined part: their new ranks are pushed, and an old entry is recognised as
    stale when popped because pair_rank[start] no longer holds its rank (the pair starting at a given
    offset only ever grows, so a rank once replaced there never returns).

    >>> ranks = {bytes([b]): b for b in range(256)} | {b"ee": 256, b"eeee": 257}
    >>> _merge_by_rank_heap(b"e" * 7, ranks) == _merge_by_rank(b"e" * 7, ranks) == [257, 256, 101]
    True
    """
    n = len(piece)
    part = {i: piece[i:i + 1] for i in range(n)}  # start offset -> the bytes of the part there (a token)
    end = {i: i + 1 for i in range(n)}            # start offset -> start of the next part (n: none)
    before = {i: i - 1 for i in range(n)}         # start offset -> start of the previous part (-1: none)
    pair_rank, heap = {}, []

    def update(start):
        """Recompute the pair whose left part starts at `start`; push it if it joins into a token."""
        right = end[start]
        rank = ranks.get(part[start] + part[right]) if right < n else None
        if rank is None:
            pair_rank.pop(start, None)
        else:
            pair_rank[start] = rank
            heapq.heappush(heap, (rank, start))

    for i in range(n - 1):
        update(i)
    while heap:
        rank, start = heapq.heappop(heap)
        if pair_rank.get(start) != rank:
            continue  # stale: that pair has since changed
        right = end[start]
        part[start], end[start] = part[start] + part.pop(right), end[right]
        pair_rank.pop(right, None)
        if end[start] < n:
            before[end[start]] = start
        update(start)
        if before[start] >= 0:
            update(before[start])
    ids, i = [], 0
    while i < n:
        ids.append(ranks[part[i]])
        i = end[i]
    return ids


def _pair_table(ranks):
    """The merge rule of `ranks` as arrays for the Numba kernel: every pair of tokens (left, right) whose
    joined bytes are a token, grouped by left id. The pairs of left id a are rights[first[a]:first[a + 1]]
    (ascending, for a binary search) and joined[...] holds the rank of each joined token. The parts of a
    piece being merged are always tokens, so this lists every pair _merge_by_rank could join.

    >>> first, rights, joined = _pair_table({b"a": 0, b"b": 1, b"ab": 2, b"abb": 3})   # a+b=ab, ab+b=abb
    >>> first.tolist(), rights.tolist(), joined.tolist()
    ([0, 1, 1, 2, 2], [1, 1], [2, 3])
    """
    pairs = sorted((ranks[token[:k]], ranks[token[k:]], rank) for token, rank in ranks.items()
                   for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks)
    lefts, rights, joined = np.array(pairs, dtype=np.int32).reshape(-1, 3).T
    first = np.searchsorted(lefts, np.arange(len(ranks) + 1)).astype(np.int32)
    return first, rights.copy(), joined.copy()


_NO_RANK = np.iinfo(np.int32).max  # in the kernel: "this pair joins into no token"


def _merge_batch_kernel(data, starts, whole, first, rights, joined, out, out_starts):
    """_merge_by_rank for many pieces at once, compiled by Numba (_compiled_kernel, called by _merge_batch_numba).

    Piece i is data[starts[i]:starts[i + 1]] (its bytes); its ids go to out[out_starts[i]:out_starts[i + 1]].
    whole[i] is the rank of the whole piece if it is a token, else -1. Like tiktoken, the kernel keeps the
    rank of each adjacent pair and after a join looks up only the two pairs that changed. A piece longer
    than _HEAP_MIN_BYTES is merged as _merge_by_rank_heap does (a heap of (rank, start) keys and a linked
    list of parts): a scan per join would make a run of one character quadratic.
    """
    longest = np.max(starts[1:] - starts[:-1])
    parts = np.empty(longest, np.int32)  # the ids of the piece being merged
    pair_rank = np.empty(longest, np.int32)  # pair_rank[j]: rank of parts[j] joined with parts[j + 1]
    heap_size = 3 * longest if longest > _HEAP_MIN_BYTES else 1  # n - 1 pairs, then at most 2 pushes a join
    heap = np.empty(heap_size, np.int64)  # keys rank << 32 | start: the smallest is the lowest rank, leftmost
    after = np.empty(longest if longest > _HEAP_MIN_BYTES else 1, np.int64)   # start of the next part
    before = np.empty_like(after)                                              # start of the previous part

    def rank_of(left, right):  # binary search among the pairs of `left`
        lo, hi = first[left], first[left + 1]
        while lo < hi:
            mid = (lo + hi) // 2
            if rights[mid] < right:
                lo = mid + 1
            else:
                hi = mid
        return joined[lo] if lo < first[left + 1] and rights[lo] == right else _NO_RANK

    def push(size, key):  # heap[:size] is a binary min-heap; returns the new size
        j = size
        heap[j] = key
        while j > 0 and heap[(j - 1) >> 1] > heap[j]:
            parent = (j - 1) >> 1
            heap[parent], heap[j] = heap[j], heap[parent]
            j = parent
        return size + 1

    def sift_down(size):  # heap[0] replaced: move it down to its place
        j = 0
        while True:
            child = 2 * j + 1
            if child >= size:
                break
            if child + 1 < size and heap[child + 1] < heap[child]:
                child += 1
            if heap[j] <= heap[child]:
                break
            heap[j], heap[child] = heap[child], heap[j]
            j = child

    def update(start, n, size):  # recompute the pair whose left part starts at `start`; push it if it joins
        right = after[start]
        pair_rank[start] = rank_of(parts[start], parts[right]) if right < n else _NO_RANK
        if pair_rank[start] != _NO_RANK:
            size = push(size, (np.int64(pair_rank[start]) << 32) | start)
        return size

    def pop_and_update(start, n, size):  # heap[0] removed and update(start) in one sift: its key replaces heap[0]
        right = after[start]
        pair_rank[start] = rank_of(parts[start], parts[right]) if right < n else _NO_RANK
        if pair_rank[start] != _NO_RANK:
            heap[0] = (np.int64(pair_rank[start]) << 32) | start
        else:
            size -= 1
            heap[0] = heap[size]
        sift_down(size)
        return size

    def pop(size):
        size -= 1
        heap[0] = heap[size]
        sift_down(size)
        return size

    n_out = 0
    for i in range(len(starts) - 1):
        if whole[i] >= 0:  # a whole piece that is a token stays one token, as in tiktoken
            out[n_out] = whole[i]
            n_out += 1
            out_starts[i + 1] = n_out
            continue
        n = starts[i + 1] - starts[i]
        parts[:n] = data[starts[i]:starts[i + 1]]
        if n > _HEAP_MIN_BYTES:  # parts[start] is the part beginning at byte `start`; only live starts are read
            size = 0
            for j in range(n):
                after[j], before[j] = j + 1, j - 1
            for j in range(n - 1):
                size = update(j, n, size)
            pair_rank[n - 1] = _NO_RANK
            while size > 0:
                key = heap[0]
                rank, start = np.int32(key >> 32), key & 0xFFFFFFFF
                if pair_rank[start] != rank:
                    size = pop(size)
                    continue  # stale: that pair has since changed
                right = after[start]
                parts[start] = rank
                after[start] = after[right]
                pair_rank[right] = _NO_RANK
                if after[start] < n:
                    before[after[start]] = start
                size = pop_and_update(start, n, size)
                if before[start] >= 0:
                    size = update(before[start], n, size)
            j = 0
            while j < n:
                out[n_out] = parts[j]
                n_out += 1
                j = after[j]
            out_starts[i + 1] = n_out
            continue
        for j in range(n - 1):
            pair_rank[j] = rank_of(parts[j], parts[j + 1])
        while n > 1:
            best = np.argmin(pair_rank[:n - 1])  # the lowest rank; argmin takes the leftmost on a tie
            if pair_rank[best] == _NO_RANK:
                break
            parts[best] = pair_rank[best]
            for j in range(best + 1, n - 1):  # close the gap left by parts[best + 1]
                parts[j] = parts[j + 1]
                pair_rank[j] = pair_rank[j + 1]
            n -= 1
            if best > 0:
                pair_rank[best - 1] = rank_of(parts[best - 1], parts[best])
            if best < n - 1:
                pair_rank[best] = rank_of(parts[best], parts[best + 1])
        out[n_out:n_out + n] = parts[:n]
        n_out += n
        out_starts[i + 1] = n_out


def _add_token(vocab, ranks, pair):
    """The id of the token made of `pair`, appended to vocab/ranks unless its bytes are known already
    (two different pairs can spell the same bytes; ranks map bytes to one id, as tiktoken's do)."""
    joined = vocab[pair[0]] + vocab[pair[1]]
    if joined not in ranks:
        ranks[joined] = len(vocab)
        vocab.append(joined)
    return ranks[joined]


def _byte_ranks():
    vocab = [bytes([b]) for b in range(256)]
    return vocab, {token: i for i, token in enumerate(vocab)}


def train_ranks_reference(piece_counts, vocab_size):
    """The readable BPE training loop: count every pair, merge the most frequent, repeat.

    Same result as the fast loop in BPETokenizer.train (tests check it); it recounts all pairs of
    all pieces at every merge, so it is slow. piece_counts: {piece str: count}; returns bytes -> rank.
    """
    vocab, ranks = _byte_ranks()
    words = [(list(piece.encode("utf-8")), count) for piece, count in piece_counts.items()]
    while len(vocab) < vocab_size:
        pair_counts = Counter()
        for ids, count in words:
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        pair = min(pair_counts, key=lambda p: (-pair_counts[p], p))  # most frequent, then smallest ids
        new_id = _add_token(vocab, ranks, pair)
        words = [(_replace_pair(ids, pair, new_id), count) for ids, count in words]
    return ranks


def _train_ranks(piece_counts, vocab_size, verbose=False):
    """Fast BPE training, same merges as train_ranks_reference.

    Three things make it fast: each distinct piece is one word with a count (tiny Shakespeare's
    263k pieces are 15k words); pair counts are updated only for the words that hold the merged
    pair (`where` finds them); and a heap of (-count, left id, right id) gives the next pair. Heap
    entries are not removed when a count changes: a fresh entry is pushed, and popped entries whose
    count no longer matches are skipped.
    """
    vocab, ranks = _byte_ranks()
    words = [list(piece.encode("utf-8")) for piece in piece_counts]
    counts = list(piece_counts.values())
    pair_counts = defaultdict(int)
    where = defaultdict(set)  # pair -> indices of words that held it (some may no longer)
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += counts[w]
            where[pair].add(w)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    n_merges = max(vocab_size - 256, 1)
    while len(vocab) < vocab_size and heap:
        negative_count, a, b = heapq.heappop(heap)
        pair = (a, b)
        if pair_counts.get(pair) != -negative_count:
            continue  # stale entry
        new_id = _add_token(vocab, ranks, pair)
        changed = set()
        for w in where.pop(pair):
            old = words[w]
            new = _replace_pair(old, pair, new_id)
            if len(new) == len(old):
                continue  # the word lost this pair to an earlier merge
            # take the word's old pairs out of the counts and put its new pairs in
            for p in zip(old, old[1:]):
                pair_counts[p] -= counts[w]
                changed.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += counts[w]
                where[p].add(w)
                changed.add(p)
            words[w] = new
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], *p))
            else:
                del pair_counts[p]
        if verbose and (len(vocab) - 256) % max(n_merges // 100, 1) == 0:
            print(f"\rBPE training: {len(vocab) - 256}/{n_merges} merges", end="", file=sys.stderr)
    if verbose:
        print(file=sys.stderr)
    return ranks
