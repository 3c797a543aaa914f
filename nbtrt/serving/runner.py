"""One model step over a mixed batch (prefill chunks and decodes) through the paged KV cache.

The batch is flattened into one row of ``N`` tokens (``input_ids`` [1, N]) and run through the
one nbtrt decoder's own blocks; each block's attention calls ``kv.attend(...)`` on a
:class:`PagedLayerKV`, which

- writes the step's keys and values into their slots (``slot_mapping``, from the block tables);
- attends: the one-token rows (decodes, first in the batch) through the block tables in one
  batched call (on CUDA the Triton kernel :mod:`nbtrt.kernels.paged_attention`, elsewhere
  :func:`paged_attention_reference`), each prefill chunk by gathering its sequence's blocks
  and running SDPA with the causal mask shifted by what was already computed.

On CUDA, a batch of decodes only runs as one CUDA graph replay, captured per bucket of batch sizes
(:data:`DECODE_BUCKETS`, padded rows write to the scratch block 0 and read nothing), with
the blocks compiled by ``torch.compile`` first as :class:`~nbtrt.runtimes.torch_engine.TorchEngine`
does. A mixed step runs *tiled*: its tokens cut into tiles of one sequence each
(:func:`nbtrt.kernels.paged_attention.paged_tile_attention`), all sizes in device tensors, so the
step is one compiled graph of dynamic size rather than a Python loop over sequences (that loop cost
an H100 ~110 ms a 2048-token step of the 8B model; tiled, 51 ms on an H200, both measured 2026-12-06).
Tiling is the default where the kernel runs; ``tiled=True`` on the CPU runs the same host-side
tiling through :func:`paged_tile_reference` (how the tests cover it).

>>> runner = ModelRunner(engine.model, pool, max_batch_size=64, max_seq_len=2048)  # doctest: +SKIP
>>> logits = runner.step(batch)  # doctest: +SKIP
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from ..generate import next_tokens
from ..model import Decoder, dense_attention
from ..runtimes.torch_engine import _LIMIT_KEY, DYNAMO_RECOMPILE_LIMIT  # one limit for every compiled step in a process
from .block_pool import BlockPool
from .scheduler import ScheduledBatch
from .sequence import Sequence

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)


# ------------------------------------------------------------------------------ attention
@torch.library.custom_op("nbtrt::write_kv", mutates_args=("k_cache", "v_cache"))
def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store a step's keys and values ``k``/``v`` [N, KV, D] at their slots of the pool. An opaque op
    that mutates the pool in place: traced as an in-place update of a view, Inductor copied the whole
    pool (seen on an H100: a 17 GiB buffer per layer)."""
    KV, D = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, KV, D).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, KV, D).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@write_kv.register_fake
def _(k_cache, v_cache, k, v, slot_mapping):
    return None


def gather_kv(cache: torch.Tensor, table: list[int] | torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first ``length`` keys (or values) [KV, length, D] out of the pool ``cache``;
    ``table`` its block ids (a list, or a tensor on the cache's device)."""
    if not torch.is_tensor(table):
        table = torch.tensor(table, device=cache.device)
    blocks = cache[table[: -(-length // cache.shape[1])]]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:length].transpose(0, 1)


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table, context: int,
                    scale: float, window: int | None = None) -> torch.Tensor:
    """Attention of a sequence's ``n`` newest tokens ``q`` [H, n, D] (their keys already in the pool)
    over its ``context`` tokens: causal, shifted by the ``context - n`` tokens computed before."""
    n = q.shape[1]
    k, v = gather_kv(k_cache, table, context), gather_kv(v_cache, table, context)
    mask = None  # no past: plain causal
    if n != context or window is not None:
        query = torch.arange(context - n, context, device=q.device)[:, None]
        key = torch.arange(context, device=q.device)[None, :]
        mask = key <= query
        if window is not None:
            mask = mask & (query - key < window)
        mask = mask[None, None]
    if q.is_cuda:  # the kernels read the shared KV heads themselves: no copy per query head
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                              scale=scale, enable_gqa=True)[0]
    return dense_attention(q[None], k[None], v[None], mask, scale)[0]


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: list[list[int]],
                              contexts: list[int], query_lens: list[int], scale: float,
                              window: int | None = None) -> torch.Tensor:
    """The plain torch path: ``q`` [N, H, D], the tokens of each sequence in turn (``query_lens``),
    each sequence attending its ``contexts[i]`` cached tokens -> [N, H, D]. What the GPU kernel
    is tested against."""
    outs, start = [], 0
    for table, context, n in zip(tables, contexts, query_lens):
        outs.append(chunk_attention(q[start:start + n].transpose(0, 1), k_cache, v_cache, table, context, scale,
                                    window).transpose(0, 1))
        start += n
    return torch.cat(outs) if outs else q.new_empty(0, *q.shape[1:])


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The decode kernel's contract in plain torch, on device tensors alone (static shapes): ``q``
    [B, H, D], ``block_tables`` [B, max_blocks], ``context_lens`` [B] -> [B, H, D]. Rows of context 0
    (padding) attend slot 0 and are ignored by the caller."""
    B, max_blocks = block_tables.shape
    bs, KV, D = k_cache.shape[1:]
    k = k_cache[block_tables.long()].reshape(B, max_blocks * bs, KV, D).transpose(1, 2)
    v = v_cache[block_tables.long()].reshape(B, max_blocks * bs, KV, D).transpose(1, 2)
    slots = torch.arange(max_blocks * bs, device=q.device)[None, :]
    seen = (slots < context_lens[:, None]) | (slots == 0)
    return dense_attention(q[:, :, None], k, v, seen[:, None, None, :], scale)[:, :, 0]


def paged_tile_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                         starts: torch.Tensor, counts: torch.Tensor, first_ctx: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """The tile kernel's contract in plain torch (:func:`nbtrt.kernels.paged_attention.paged_tile_attention`):
    every token of tile ``i`` attends through ``tables[i]`` to the keys before and at its own position."""
    tile_of_row = torch.repeat_interleave(torch.arange(len(counts), device=q.device), counts.long())
    row = torch.arange(q.shape[0], device=q.device)
    context = first_ctx.long()[tile_of_row] + row - starts.long()[tile_of_row]
    return paged_decode_reference(q, k_cache, v_cache, tables[tile_of_row], context, scale)


class StepMeta:
    """What attention needs to know about a step. ``all_decodes``: every row is a one-token
    sequence and the kernel reads the device tensors alone (the compiled, graphed decode)."""

    def __init__(self, slot_mapping, block_tables=None, context_lens=None, split=0, use_kernel=False,
                 all_decodes=False, num_decodes=0, tables=(), contexts=(), query_lens=(), window=None, tiles=None):
        self.slot_mapping, self.block_tables, self.context_lens, self.split = slot_mapping, block_tables, context_lens, split
        self.tiles = tiles  # (tables, starts, counts, first_ctx): the tiled mixed step
        self.use_kernel, self.all_decodes, self.num_decodes = use_kernel, all_decodes, num_decodes
        self.tables, self.contexts, self.query_lens, self.window = tables, contexts, query_lens, window


class PagedLayerKV:
    """One layer's view of the paged cache for one step; ``attend`` is the decoder's swap point.
    The layer index is ignored: the runner hands each block its own layer's pool tensors, so one
    compiled graph serves every layer."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: StepMeta):
        self.k_cache, self.v_cache, self.meta = k_cache, v_cache, meta

    def attend(self, layer, q, k, v, mask, scale, cache_position):
        m = self.meta
        torch.ops.nbtrt.write_kv(self.k_cache, self.v_cache, k[0].transpose(0, 1), v[0].transpose(0, 1), m.slot_mapping)
        qf = q[0].transpose(0, 1)  # [N, H, D]
        if m.tiles is not None:
            args = (qf, self.k_cache, self.v_cache, *m.tiles, scale)
            out = torch.ops.nbtrt.paged_tile_attention(*args) if m.use_kernel else paged_tile_reference(*args)
            return out.transpose(0, 1)[None]
        if m.all_decodes:
            args = (qf, self.k_cache, self.v_cache, m.block_tables, m.context_lens, scale)
            out = (torch.ops.nbtrt.paged_decode_attention(*args, m.split) if m.use_kernel
                   else paged_decode_reference(*args))
            return out.transpose(0, 1)[None]
        nd, parts = m.num_decodes, []
        if nd and m.use_kernel:
            parts.append(torch.ops.nbtrt.paged_decode_attention(
                qf[:nd], self.k_cache, self.v_cache, m.block_tables, m.context_lens, scale, m.split))
        elif nd and m.window is None:  # the kernel's plain torch twin: one batched gather, not one per sequence
            parts.append(paged_decode_reference(qf[:nd], self.k_cache, self.v_cache, m.block_tables, m.context_lens,
                                                scale))
        elif nd:
            parts.append(paged_attention_reference(qf[:nd], self.k_cache, self.v_cache, m.tables[:nd],
                                                   m.contexts[:nd], [1] * nd, scale, m.window))
        if nd < len(m.query_lens):
            parts.append(paged_attention_reference(qf[nd:], self.k_cache, self.v_cache, m.tables[nd:],
                                                   m.contexts[nd:], m.query_lens[nd:], scale, m.window))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.transpose(0, 1)[None]  # [1, H, N, D]


# ------------------------------------------------------------------------------ the step
def _prelude(model: Decoder, input_ids, positions):
    x = model.embed(input_ids, positions)
    return x, (model.rope(positions, x.dtype) if model.rope is not None else None)


def _block(block, x, rope, k_cache, v_cache, slot_mapping, block_tables, context_lens, split, use_kernel=True):
    meta = StepMeta(slot_mapping, block_tables, context_lens, split, use_kernel=use_kernel, all_decodes=True)
    return block(x, rope, None, PagedLayerKV(k_cache, v_cache, meta), None)


def _tile_block(block, x, rope, k_cache, v_cache, slot_mapping, tables, starts, counts, first_ctx, use_kernel=True):
    meta = StepMeta(slot_mapping, use_kernel=use_kernel, tiles=(tables, starts, counts, first_ctx))
    return block(x, rope, None, PagedLayerKV(k_cache, v_cache, meta), None)


def _head(model: Decoder, x, logits_indices):
    return model.lm_head(model.final_norm(x.index_select(1, logits_indices)))[0]


class ModelRunner:
    """Runs scheduled batches on ``model`` (the engine's decoder, quantized linears already swapped in)
    over ``pool``. ``cuda_graphs`` (CUDA only): decode-only steps replay captured graphs of the
    compiled blocks. ``tiled``: mixed steps run tiled (default: where the Triton kernel runs; on the CPU,
    if asked, through its plain torch twin)."""

    def __init__(self, model: Decoder, pool: BlockPool, *, max_batch_size: int, max_seq_len: int,
                 cuda_graphs: bool | None = None, tiled: bool | None = None):
        from ..kernels import paged_attention

        self.model, self.pool = model, pool
        self.device = next(model.parameters()).device
        self.max_blocks = -(-max_seq_len // pool.block_size)
        self.window = model.cfg.sliding_window if (model.cfg.sliding_window or 0) < max_seq_len else None
        self.use_kernel = self.window is None and paged_attention.takes(
            torch.empty(1, 1, model.cfg.head_dim, dtype=pool.k[0].dtype, device=self.device), pool.k[0])
        self.split = paged_attention.keys_per_split(self.max_blocks * pool.block_size)
        self.cuda_graphs = (self.device.type == "cuda" and self.use_kernel) if cuda_graphs is None else cuda_graphs
        self.buckets = [b for b in DECODE_BUCKETS if b < max_batch_size] + [max_batch_size]
        self._graphs: dict[int, SimpleNamespace] = {}
        self._graph_pool = None
        self.tiled = (self.use_kernel if tiled is None else bool(tiled)) and self.window is None
        self.tile_tokens = paged_attention.tokens_per_tile(model.cfg.num_heads // model.cfg.num_kv_heads)
        self._fns = (_prelude, _block, _head)  # off CUDA: the bucketed decode runs eagerly (how CPU tests cover it)
        self._tile_fns = (_prelude, _tile_block, _head)
        if self.device.type == "cuda":
            opts = {"coordinate_descent_tuning": True, "triton.enable_pdl": True}
            if self.cuda_graphs:
                self._fns = tuple(torch.compile(f, dynamic=None, fullgraph=True, options=opts) for f in self._fns)
            if self.tiled:  # every size of a mixed step varies: one dynamic graph, not one per size
                self._tile_fns = tuple(torch.compile(f, dynamic=True, fullgraph=True, options=opts)
                                       for f in self._tile_fns)

    # -------------------------------------------------------------- host-side metadata
    def _meta(self, batch: ScheduledBatch) -> StepMeta:
        ids, positions, slots, logits_rows, blocks, contexts = [], [], [], [], [], []
        bs = self.pool.block_size
        for seq, n in zip(batch.seqs, batch.num_new):
            start, end = seq.num_computed, seq.num_computed + n
            ids += seq.feed(start, end)
            positions += range(start, end)
            slots += self.pool.slots(seq.block_table, start, end)
            if end == seq.num_tokens:  # the chunk reaches the end: its last row gives the next token
                logits_rows.append(len(ids) - 1)
            blocks.append(seq.block_table[: -(-end // bs)])
            contexts.append(end)
        # everything in one host tensor, one copy to the device, then views
        N, S = len(ids), len(logits_rows)
        host = torch.tensor(ids + positions + slots + logits_rows + [b for t in blocks for b in t], dtype=torch.long)
        dev_all = host.to(self.device, non_blocking=True)
        tables, at = [], 3 * N + S
        for t in blocks:
            tables.append(dev_all[at:at + len(t)])
            at += len(t)
        meta = StepMeta(dev_all[2 * N:3 * N], split=self.split, use_kernel=self.use_kernel,
                        num_decodes=batch.num_decodes, tables=tables, contexts=contexts,
                        query_lens=list(batch.num_new), window=self.window)
        if meta.num_decodes:
            meta.block_tables, meta.context_lens = self._tables(blocks[:meta.num_decodes], contexts[:meta.num_decodes])
        meta.input_ids, meta.positions = dev_all[:N][None], dev_all[N:2 * N][None]
        meta.logits_indices = dev_all[3 * N:3 * N + S]
        return meta

    def _tile_meta(self, batch: ScheduledBatch) -> SimpleNamespace:
        """The tiled step's inputs: the tokens (ids, positions, slots), the rows whose logits are
        wanted, and per tile its first row, token count, first token's context and block table."""
        bs, per_tile = self.pool.block_size, self.tile_tokens
        ids, positions, slots, logits_rows, tile_seq, starts, counts, first_ctx = [], [], [], [], [], [], [], []
        tables = []
        for s, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start, end, row0 = seq.num_computed, seq.num_computed + n, len(ids)
            ids += seq.feed(start, end)
            positions += range(start, end)
            slots += self.pool.slots(seq.block_table, start, end)
            if end == seq.num_tokens:
                logits_rows.append(len(ids) - 1)
            for j in range(0, n, per_tile):
                tile_seq.append(s)
                starts.append(row0 + j)
                counts.append(min(per_tile, n - j))
                first_ctx.append(start + j + 1)
            tables.append(seq.block_table[: -(-end // bs)])
        width = max(map(len, tables))
        seq_tables = np.zeros((len(tables), width), np.int32)
        for s, table in enumerate(tables):
            seq_tables[s, :len(table)] = table
        N, S, T = len(ids), len(logits_rows), len(starts)
        longs = torch.tensor(ids + positions + slots + logits_rows, dtype=torch.long).to(self.device, non_blocking=True)
        ints = torch.from_numpy(np.concatenate([np.array(starts + counts + first_ctx, np.int32),
                                                seq_tables[tile_seq].ravel()])).to(self.device, non_blocking=True)
        return SimpleNamespace(input_ids=longs[:N][None], positions=longs[N:2 * N][None], slot_mapping=longs[2 * N:3 * N],
                               logits_indices=longs[3 * N:3 * N + S], starts=ints[:T], counts=ints[T:2 * T],
                               first_ctx=ints[2 * T:3 * T], tables=ints[3 * T:].view(T, width))

    def _tables(self, tables: list[list[int]], contexts: list[int]):
        """Block tables as wide as the longest (the kernel reads no further than each context)."""
        t = np.zeros((len(tables), max(map(len, tables))), np.int32)
        for i, table in enumerate(tables):
            t[i, :len(table)] = table
        return (torch.from_numpy(t).to(self.device, non_blocking=True),
                torch.tensor(contexts, dtype=torch.int32).to(self.device, non_blocking=True))

    # -------------------------------------------------------------- running
    @torch.inference_mode()
    def step(self, batch: ScheduledBatch, fed: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``batch``; return logits [S, V] for the sequences whose chunk reached their end (in
        batch order). Advances each sequence's ``num_computed``. ``fed``: the input ids of the first
        ``len(fed)`` rows, already on the device (the tokens the previous step sampled, not read back:
        their host placeholders are overwritten here, in stream order, before the step reads them)."""
        if self.cuda_graphs and batch.num_decodes == len(batch.seqs) and len(batch.seqs) <= self.buckets[-1]:
            logits = self._graphed_decode(batch, fed)
        elif self.tiled:
            m = self._tile_meta(batch)
            _overwrite_ids(m.input_ids, fed)
            logits = self._run_tiled(m)
        else:
            meta = self._meta(batch)
            _overwrite_ids(meta.input_ids, fed)
            logits = self._eager(meta)
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
        return logits

    def _eager(self, meta: StepMeta) -> torch.Tensor:
        model = self.model
        x, rope = _prelude(model, meta.input_ids, meta.positions)
        for layer, k_cache, v_cache in zip(model.layers, self.pool.k, self.pool.v):
            x = layer(x, rope, None, PagedLayerKV(k_cache, v_cache, meta), None)
        return _head(model, x, meta.logits_indices)

    def _run_tiled(self, m: SimpleNamespace) -> torch.Tensor:
        prelude, block, head = self._tile_fns
        with torch._dynamo.config.patch(**{_LIMIT_KEY: DYNAMO_RECOMPILE_LIMIT}):
            x, rope = prelude(self.model, m.input_ids, m.positions)
            for layer, k_cache, v_cache in zip(self.model.layers, self.pool.k, self.pool.v):
                x = block(layer, x, rope, k_cache, v_cache, m.slot_mapping, m.tables, m.starts, m.counts, m.first_ctx,
                          self.use_kernel)
            return head(self.model, x, m.logits_indices)

    def _graphed_decode(self, batch: ScheduledBatch, fed: torch.Tensor | None = None) -> torch.Tensor:
        n = len(batch.seqs)
        bucket = next(b for b in self.buckets if b >= n)
        st = self._graphs.get(bucket) or self._capture(bucket)
        bs = self.pool.block_size
        # one pinned host buffer per bucket, two copies a step: the sample() that follows the replay
        # waits for the step, so the buffers are free again when the next step fills them
        inputs, tables = st.host_inputs.numpy(), st.host_tables.numpy()
        inputs[:, n:] = 0  # padded rows: token 0 at position 0, written to the scratch slot 0, context 0
        for i, seq in enumerate(batch.seqs):
            p = seq.num_computed
            table = seq.block_table
            inputs[:, i] = (seq.token_at(p), p, table[p // bs] * bs + p % bs, p + 1)
            tables[i, :len(table)] = table
        st.inputs.copy_(st.host_inputs, non_blocking=True)
        st.tables.copy_(st.host_tables, non_blocking=True)
        _overwrite_ids(st.inputs[0:1], fed)
        if st.graph is None:
            return self._run_static(st)[:n]
        st.graph.replay()
        return st.logits[:n].clone()

    def _run_static(self, st: SimpleNamespace) -> torch.Tensor:
        prelude, block, head = self._fns
        with torch._dynamo.config.patch(**{_LIMIT_KEY: DYNAMO_RECOMPILE_LIMIT}):
            x, rope = prelude(self.model, st.inputs[0:1], st.inputs[1:2])
            for layer, k_cache, v_cache in zip(self.model.layers, self.pool.k, self.pool.v):
                x = block(layer, x, rope, k_cache, v_cache, st.inputs[2], st.tables, st.inputs[3], self.split,
                          self.use_kernel)
            return head(self.model, x, st.rows)

    def _capture(self, bucket: int) -> SimpleNamespace:
        dev = self.device
        cuda = dev.type == "cuda"
        # inputs rows: token ids, positions, slots, context lengths
        st = SimpleNamespace(inputs=torch.zeros(4, bucket, dtype=torch.long, device=dev),
                             tables=torch.zeros(bucket, self.max_blocks, dtype=torch.int32, device=dev),
                             host_inputs=torch.zeros(4, bucket, dtype=torch.long, pin_memory=cuda),
                             host_tables=torch.zeros(bucket, self.max_blocks, dtype=torch.int32, pin_memory=cuda),
                             rows=torch.arange(bucket, device=dev), graph=None, logits=None)
        if not cuda:
            self._graphs[bucket] = st
            return st
        # warm up (compiles) on a side stream, then capture; all rows pad: they write the scratch block
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run_static(st)
        torch.cuda.current_stream(dev).wait_stream(side)
        self._graph_pool = self._graph_pool or torch.cuda.graph_pool_handle()
        st.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(st.graph, pool=self._graph_pool):
            st.logits = self._run_static(st)
        self._graphs[bucket] = st
        return st

    def warmup(self, progress: bool = True) -> None:
        """Compile the tiled step and capture every decode bucket now rather than at the first request."""
        from tqdm.auto import tqdm

        if self.tiled and self.device.type == "cuda":
            self._warm_tiled()
        if not self.cuda_graphs:
            return
        for bucket in tqdm(self.buckets, desc="torch.compile + CUDA graphs (decode buckets)", disable=not progress,
                           leave=False):
            if bucket not in self._graphs:
                self._capture(bucket)

    def _warm_tiled(self) -> None:
        """Two tiled steps of different sizes writing only the scratch block 0: the dynamic graph is
        compiled before the first request (sizes of 1 would be specialised: none here)."""
        for n_tiles in (2, 3):
            n = n_tiles * self.tile_tokens + 1
            z = torch.zeros(n, dtype=torch.long, device=self.device)
            t = n_tiles + 1
            m = SimpleNamespace(input_ids=z[None], positions=z[None], slot_mapping=z, logits_indices=z[:2],
                                starts=torch.arange(0, n, self.tile_tokens, dtype=torch.int32, device=self.device),
                                counts=torch.tensor([self.tile_tokens] * n_tiles + [1], dtype=torch.int32, device=self.device),
                                first_ctx=torch.ones(t, dtype=torch.int32, device=self.device),
                                tables=torch.zeros(t, 2, dtype=torch.int32, device=self.device))
            self._run_tiled(m)


def _overwrite_ids(input_ids: torch.Tensor, fed: torch.Tensor | None) -> None:
    if fed is not None:
        input_ids[0, :len(fed)].copy_(fed)


# ------------------------------------------------------------------------------ sampling
def plain_greedy(seq: Sequence) -> bool:
    """Its next token is its logits' argmax and nothing else (no penalty reads its history)."""
    return seq.params.greedy and seq.params.repetition_penalty == 1.0


def sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
    """One next token per sequence under its own SamplingParams: greedy rows in one argmax, the
    others one by one through :func:`nbtrt.generate.next_tokens` (own generator, own history)."""
    plain = [i for i, s in enumerate(seqs) if plain_greedy(s)]
    out = [0] * len(seqs)
    if plain:
        rows = logits if len(plain) == len(seqs) else logits[torch.tensor(plain, device=logits.device)]
        for i, t in zip(plain, rows.float().argmax(-1).tolist()):
            out[i] = t
    done = set(plain)
    for i, s in enumerate(seqs):
        if i in done:
            continue
        history = None
        if s.params.repetition_penalty != 1.0:
            history = torch.tensor([s.tokens], device=logits.device)
        if s.generator is None and s.params.seed is not None:
            s.generator = torch.Generator(device=logits.device).manual_seed(s.params.seed)
        out[i] = int(next_tokens(logits[i:i + 1], s.params, s.generator, history)[0])
    return out
