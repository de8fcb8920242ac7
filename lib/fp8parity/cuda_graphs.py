"""CUDA graphs of repeated GPU forwards and traced decode steps: a shape seen twice is captured once and replayed after.

An eager forward launches every op from Python (about 40 per layer, and each te.Linear call costs ~0.2 ms of host
time), so a short forward on the GPU is host-bound: 3 ms of CUDA inside 30-70 ms of wall time. A graph replays the
same kernels with one launch. It runs the same code (`Qwen2Model.body`) on fixed buffers: the token rows and, for a
decode step, the position are written in; the embedding table is gathered on the GPU (the same dequantized values
the eager path reads row by row on the host); the K/V cache is a `StaticKVCache` this object owns.

A traced decode step (a `Recorder` attached, one token) is captured too, as a graph of its own: each tap the recorder
wants is copied inside the graph into a buffer of the graph's; after a replay the buffers go to the recorder as one
block (`Recorder.stage`), copied to the host when it is read. The traced graph computes the same kernels as the untraced
one, plus the copies.

Graphs are used only where nothing on the host looks inside the forward: a backend that says it is `graph_safe` (no
statistics, no calibration, no fault wrapper) and the file's own recipe (no planted fault). Everything else runs
eagerly over the same static cache, so both ways compute the same numbers (tests/test_cuda_graphs.py checks logits and
every tap bit for bit on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8parity.taps import private_copy

CAPACITY_STEP = 256  # static caches come in multiples of this many positions: a few shapes, each captured once


@dataclass
class Graph:
    """One captured forward and the buffers it reads and writes."""

    graph: torch.cuda.CUDAGraph
    rows: torch.Tensor  # the tokens' embedding rows, written before a replay
    pos: torch.Tensor | None  # a decode step's position, written before a replay
    out: torch.Tensor  # the logits the replay writes
    taps: list[tuple[str, int, torch.Tensor]]  # a traced graph's (op, layer, (T, n) float32 copy) the replay writes


class _CaptureRecorder:
    """Stands in for a Recorder while a forward is captured: each wanted tap copied into a buffer of the graph."""

    def __init__(self, recorder):
        self.recorder, self.taps = recorder, []

    def wants(self, op: str, layer: int) -> bool:
        return self.recorder.wants(op, layer)

    def last_layer(self) -> int | None:
        return self.recorder.last_layer()  # None: a recorder that ends the forward early is not captured

    def record(self, op: str, layer: int, x: torch.Tensor, positions) -> None:
        if self.wants(op, layer):
            self.taps.append((op, layer, private_copy(x)))


class CudaGraphs:
    """The graphs and static K/V caches of one model on the GPU."""

    def __init__(self, model):
        self.model = model
        self.caches: dict[int, object] = {}  # capacity -> StaticKVCache handed out by new_cache
        self.scratch: dict[int, object] = {}  # capacity -> the cache a prefill without one writes into
        self.graphs: dict[tuple, Graph] = {}
        self.seen: set[tuple] = set()
        self.pool = None  # one memory pool for all of this model's graphs: they never run at once
        self._table: torch.Tensor | None = None  # the token embedding table on the GPU
        self.captures = self.replays = 0
        # the file's own recipe: a planted fault (options set when the model is built) keeps every forward eager
        self._plain = model.options == type(model.options)()

    @staticmethod
    def capacity_for(tokens: int) -> int:
        return max(1, -(-tokens // CAPACITY_STEP)) * CAPACITY_STEP

    def _static(self, table: dict, tokens: int):
        from fp8parity.qwen2 import StaticKVCache

        cap = self.capacity_for(tokens)
        cache = table.get(cap)
        if cache is None:
            m = self.model
            cache = table[cap] = StaticKVCache(m.cfg, cap, m.device, m.dtype)
        return cache.reset()

    def new_cache(self, tokens: int):
        """A static cache for `tokens` positions, emptied. One per capacity: asking again empties the same one."""
        return self._static(self.caches, tokens)

    def usable(self) -> bool:
        return self._plain and getattr(self.model.backend, "graph_safe", False)

    def forward(self, ids: list[int], cache, logits_for, path: str, recorder=None) -> torch.Tensor | None:
        """The logits from a graph, or None where this forward runs eagerly (its shape seen once, or not graphable).
        With a `recorder`, the taps it wants are handed to it too."""
        if not self.usable() or not (logits_for in ("last", "all") or isinstance(logits_for, slice)):
            return None
        # which logits come back, as a hashable key (a slice is not hashable before Python 3.12)
        kept = (logits_for.start, logits_for.stop, logits_for.step) if isinstance(logits_for, slice) else logits_for
        T = len(ids)
        if cache is None:
            cache, key = self._static(self.scratch, T), ("prefill", T, kept, "scratch")
        elif cache is not self.caches.get(getattr(cache, "capacity", None)):
            return None  # a cache this object does not own (a growing one, or a static one made elsewhere)
        elif cache.length == 0:
            key = ("prefill", T, kept, cache.capacity)
        elif T == 1:
            key = ("decode", cache.capacity)
        else:
            return None  # a prefill continuing a cache: eager
        if recorder is not None and (T > 1 or isinstance(logits_for, slice) or recorder.last_layer() is not None):
            # a traced prefill is one forward; its graph would hold every tap (7B, 2048 tokens: 20 GB); a recorder that
            # ends the forward early keeps a few taps of a few layers
            return None
        key += ("traced", recorder.filter_key()) if recorder is not None else ()
        if key not in self.graphs and key not in self.seen:
            self.seen.add(key)
            return None  # first sighting: eager (a shape seen once is not worth a capture)
        cache.reserve(self.model.cfg.n_layers, T)
        rows = self.model.embed_rows(ids)
        g = self.graphs.get(key) or self._capture(key, rows, cache, logits_for, path, recorder)
        if T == 1:
            g.rows.fill_(rows[0])  # no host-to-device copy: a fill kernel takes the value as an argument
        else:
            g.rows.copy_(torch.tensor(rows))
        if g.pos is not None:
            g.pos.fill_(cache.length)
        start = cache.length
        g.graph.replay()
        self.replays += 1
        if g.taps:  # one copy of every tap out of the graph's buffers, before the next replay overwrites them
            layout = [(op, layer, *t.shape, [start]) for op, layer, t in g.taps]  # one token: every tap one row
            recorder.stage(torch.cat([t.reshape(-1) for _, _, t in g.taps]), layout)
        cache.advance(T)
        return g.out.clone()  # the graph overwrites its output at the next replay

    def table(self) -> torch.Tensor:
        if self._table is None:
            self._table = self.model.embedding_table()
        return self._table

    def _capture(self, key: tuple, rows: list[int], cache, logits_for, path: str, recorder=None) -> Graph:
        m = self.model
        srows = torch.tensor(rows, device=m.device)
        pos = torch.full((1,), cache.length, dtype=torch.long, device=m.device) if key[0] == "decode" else None
        start = pos if pos is not None else cache.length
        table = self.table()

        def body(rec=None) -> torch.Tensor:
            with m.backend.forward_context():
                return m.body(table.index_select(0, srows), start, cache, rec, logits_for, path)

        # warm up on a side stream (lazy initialisation, workspaces) as torch.cuda.graph's documentation asks; it
        # writes this forward's own K/V slots, which the replay writes again
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body(None if recorder is None else _CaptureRecorder(recorder))
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        taps = None if recorder is None else _CaptureRecorder(recorder)
        with torch.cuda.graph(graph, pool=self.pool):
            out = body(taps)
        self.captures += 1
        g = self.graphs[key] = Graph(graph, srows, pos, out, [] if taps is None else taps.taps)
        return g

    def clear(self) -> None:
        """Forget every graph (a calibration changed the backend's scales or FP8 weights behind them)."""
        self.graphs.clear()
        self.seen.clear()

    def describe(self) -> dict:
        return {"graphs": len(self.graphs), "captures": self.captures, "replays": self.replays,
                "static_caches": sorted(self.caches)}
