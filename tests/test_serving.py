"""In-flight batching over the paged KV cache (nbtrt.serving), on the CPU with tiny random-weight
models of real architectures: every greedy output equals the same request run alone through the
static engine (fp32, token for token), whatever joins or leaves the batch around it; chunked
prefill, preemption and cancellation change nothing and leak no block."""
import asyncio
import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import nbtrt
from nbtrt._io import copy_tokenizer_files
from nbtrt.generate import GenerationError
from nbtrt.model import dense_attention
from nbtrt.serving.runner import paged_attention_reference
from nbtrt.testing import tiny_hf_model


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen2ForCausalLM"])
def tiny(request, tmp_path_factory):
    """A tiny model's torch engine directory (fp32) and the static engine loaded from it."""
    root = tmp_path_factory.mktemp(f"serving-{request.param}")
    src = tiny_hf_model(request.param, root / "hf")
    ckpt = nbtrt.convert(src, root / "ckpt")
    edir = nbtrt.build(ckpt, root / "engine", backend="torch", max_batch_size=1, max_input_len=128, max_seq_len=256)
    return SimpleNamespace(root=root, src=src, ckpt=ckpt, edir=edir, static=nbtrt.load(edir))


def alone(static, prompt, max_new_tokens):
    """The reference: the request on its own through the static engine's generation loop."""
    return static.generate(input_ids=[prompt], max_new_tokens=max_new_tokens, stop_token_ids=())[0]


def random_requests(n, seed, vocab=257, max_prompt=40, max_new=24):
    g = random.Random(seed)
    return [([g.randrange(vocab) for _ in range(g.randint(1, max_prompt))], g.randint(1, max_new)) for _ in range(n)]


async def staggered(llm, requests, arrival_steps):
    """Each request joins once the engine has run its arrival step (some before the first step,
    some mid-run), streamed; returns the finished outputs in order."""
    def due(at):  # its step has run, or the engine went idle before it (never wait on an idle engine)
        st = llm.stats()
        return st["steps"] >= at or (st["steps"] > 0 and not st["running"] and not st["waiting"])

    async def one(prompt, new, at):
        while not due(at):
            await asyncio.sleep(0.001)
        last = None
        params = llm.sampling(max_new_tokens=new, stop_token_ids=())
        async for out in llm.generate_async(prompt, params):
            last = out
        return last

    return await asyncio.gather(*(one(p, n, at) for (p, n), at in zip(requests, arrival_steps)))


@pytest.mark.parametrize("bucketed,tiled", [(False, False), (True, False), (False, True)],
                         ids=["eager-decode", "bucketed-decode", "tiled-mixed"])
def test_inflight_greedy_equals_alone(tiny, bucketed, tiled):
    """``bucketed``: decode-only steps through the static, padded buffers the CUDA graphs replay
    (run eagerly on the CPU, with the decode kernel's plain torch twin). ``tiled``: every other step
    through the tile kernel's host-side tiling and its plain torch twin."""
    requests = random_requests(14, seed=1)
    arrivals = [0, 0, 0, 2, 3, 5, 8, 8, 12, 15, 20, 21, 30, 31]
    # a small token budget (chunked prefill of the longer prompts) and a pool too small for every
    # sequence at once (preemption): neither may change a greedy token
    with nbtrt.LLM(tiny.edir, max_batch_size=6, max_num_tokens=16, block_size=4, num_blocks=24, verbose=False,
                   cuda_graphs=bucketed, tiled=tiled) as llm:
        outs = asyncio.run(staggered(llm, requests, arrivals))
        stats = llm.stats()
        llm.pool.check_no_leaks()
    assert stats["preemptions"] > 0, stats
    for (prompt, new), out in zip(requests, outs):
        assert out.finished and out.finish_reason == "length"
        assert out.token_ids == alone(tiny.static, prompt, new), f"request {out.request_id} differs"


@pytest.mark.parametrize("tiled", [False, True], ids=["per-sequence", "tiled"])
def test_prefix_caching_shares_blocks_and_changes_no_token(tiny, tiled):
    """Requests that share a system prompt (and some that repeat a whole prompt, one of them a whole
    number of blocks long) share its KV blocks: fewer tokens computed, greedy outputs equal to the
    request run alone; a pool too small to keep everything evicts remembered blocks and still
    changes nothing; with prefix_caching=False nothing is shared."""
    g = random.Random(7)
    system = [g.randrange(257) for _ in range(13)]  # 3 full blocks of 4, and one token more
    requests = [(system + [g.randrange(257) for _ in range(g.randint(1, 9))], g.randint(2, 12)) for _ in range(10)]
    requests += [requests[0], (system[:12], 6), (system[:12], 6), (system[:8] + [1, 2, 3], 5)]
    arrivals = [0, 0, 2, 3, 5, 8, 8, 12, 15, 20, 40, 41, 60, 61]
    for num_blocks in (64, 12):  # roomy; and small enough that remembered blocks must be evicted
        with nbtrt.LLM(tiny.edir, max_batch_size=4, max_num_tokens=16, block_size=4, num_blocks=num_blocks,
                       verbose=False, tiled=tiled) as llm:
            outs = asyncio.run(staggered(llm, requests, arrivals))
            stats = llm.stats()
            llm.pool.check_no_leaks()
            params = llm.sampling(max_new_tokens=2, stop_token_ids=())
            assert llm.generate([requests[0][0]], params, use_tqdm=False)[0].metrics["num_cached_tokens"] > 0
            llm.reset_prefix_cache()  # forgotten: the same prompt is computed in full
            assert llm.generate([requests[0][0]], params, use_tqdm=False)[0].metrics["num_cached_tokens"] == 0
            llm.pool.check_no_leaks()
        for (prompt, new), out in zip(requests, outs):
            assert out.token_ids == alone(tiny.static, prompt, new), f"request {out.request_id} differs"
        cached = [o.metrics["num_cached_tokens"] for o in outs]
        assert all(c % 4 == 0 and c < len(p) for c, (p, _) in zip(cached, requests))  # whole blocks, never the last token
        assert stats["prefix_cached_tokens"] == sum(cached) > 0, stats
        if num_blocks == 64:  # the first request computes the system prompt; later ones share its 3 blocks
            assert cached[0] == 0 and max(cached[1:]) >= 12
            assert cached[10] >= 12  # a repeated prompt: everything but its last block
            assert cached[12] == 8  # 12 tokens, 3 whole blocks: the last one is computed again (its logits)
    with nbtrt.LLM(tiny.edir, max_batch_size=4, block_size=4, num_blocks=64, verbose=False,
                   prefix_caching=False) as llm:
        outs = llm.generate([p for p, _ in requests[:3]], llm.sampling(max_new_tokens=4, stop_token_ids=()),
                            use_tqdm=False)
        assert llm.stats()["prefix_cached_tokens"] == 0 and "prefix caching" not in repr(llm.pool.describe())


@pytest.mark.parametrize("tiled", [False, True], ids=["per-sequence", "tiled"])
def test_chunked_prefill_equals_unchunked(tiny, tiled):
    requests = random_requests(6, seed=2, max_prompt=100)
    results = []
    for budget in (5, 512):
        with nbtrt.LLM(tiny.edir, max_batch_size=4, max_num_tokens=budget, verbose=False, tiled=tiled) as llm:
            results.append([o.token_ids for o in llm.generate(
                [p for p, _ in requests], [llm.sampling(max_new_tokens=n, stop_token_ids=()) for _, n in requests],
                use_tqdm=False)])
    assert results[0] == results[1]
    assert results[1] == [alone(tiny.static, p, n) for p, n in requests]


def test_overlapped_steps_change_no_token_and_stop_in_time(tiny):
    """With overlap the next step is launched before a step's tokens are read back, so a request that
    stops on a token has one extra step computed: it must be thrown away (no token, no leaked block).
    Each request stops on a token from the middle of its own greedy answer."""
    requests = random_requests(8, seed=3, max_prompt=30, max_new=24)
    stops, expected = [], []
    for prompt, new in requests:
        ref = alone(tiny.static, prompt, new)
        stop = ref[len(ref) // 2]
        stops.append(stop)
        expected.append(ref[:ref.index(stop) + 1])
    results = {}
    for overlap in (True, False):
        with nbtrt.LLM(tiny.edir, max_batch_size=8, max_num_tokens=64, verbose=False, overlap=overlap) as llm:
            params = [llm.sampling(max_new_tokens=n, stop_token_ids=(t,)) for (_, n), t in zip(requests, stops)]
            outs = llm.generate([p for p, _ in requests], params, use_tqdm=False)
            results[overlap] = (outs, llm.stats())
            llm.pool.check_no_leaks()
    for overlap, (outs, stats) in results.items():
        assert [o.token_ids for o in outs] == expected, f"overlap={overlap}"
        assert all(o.finish_reason == ("stop" if o.token_ids[-1] == t else "length") for o, t in zip(outs, stops))
        assert stats["tokens_generated"] == sum(map(len, expected))
    assert results[True][1]["overlapped_steps"] > 0 and results[False][1]["overlapped_steps"] == 0


def random_tiles(query_lens, contexts, per_tile, bs, num_blocks, seed=0):
    """Block tables in no particular order and the tiles of a mixed step (as ModelRunner cuts them)."""
    free = list(range(1, num_blocks))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(-(-c // bs))] for c in contexts]
    width = max(map(len, tables))
    rows, tiles = 0, []
    for s, (n, c) in enumerate(zip(query_lens, contexts)):
        for j in range(0, n, per_tile):
            tiles.append((rows + j, min(per_tile, n - j), c - n + j + 1, s))
        rows += n
    t = torch.zeros(len(tiles), width, dtype=torch.int32)
    for i, (*_, s) in enumerate(tiles):
        t[i, :len(tables[s])] = torch.tensor(tables[s], dtype=torch.int32)
    starts, counts, first = (torch.tensor([x[k] for x in tiles], dtype=torch.int32) for k in range(3))
    return tables, (t, starts, counts, first)


def test_paged_tile_reference_matches_per_sequence_reference():
    from nbtrt.serving.runner import paged_tile_reference

    torch.manual_seed(0)
    H, KV, D, bs = 4, 2, 16, 4
    k_cache, v_cache = torch.randn(40, bs, KV, D), torch.randn(40, bs, KV, D)
    contexts, query_lens = [7, 1, 30, 5], [3, 1, 30, 1]
    tables, tiles = random_tiles(query_lens, contexts, per_tile=4, bs=bs, num_blocks=40)
    q = torch.randn(sum(query_lens), H, D)
    got = paged_tile_reference(q, k_cache, v_cache, *tiles, 0.25)
    want = paged_attention_reference(q, k_cache, v_cache, tables, contexts, query_lens, 0.25)
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(32, 8), (14, 2), (8, 8)], ids=["gqa4", "gqa7", "mha"])
def test_paged_tile_kernel_matches_reference(dtype, heads):
    from nbtrt.kernels import paged_attention

    torch.manual_seed(0)
    (H, KV), D, bs = heads, 64, 16
    k_cache = torch.randn(400, bs, KV, D, device="cuda", dtype=dtype)
    v_cache = torch.randn(400, bs, KV, D, device="cuda", dtype=dtype)
    contexts, query_lens = [1, 17, 300, 1000, 40, 129], [1, 17, 100, 1, 1, 129]
    per_tile = paged_attention.tokens_per_tile(H // KV)
    tables, tiles = random_tiles(query_lens, contexts, per_tile, bs, 400)
    tiles = tuple(t.cuda() for t in tiles)
    q = torch.randn(sum(query_lens), H, D, device="cuda", dtype=dtype)
    got = torch.ops.nbtrt.paged_tile_attention(q, k_cache, v_cache, *tiles, D ** -0.5)
    want = paged_attention_reference(q, k_cache, v_cache, tables, contexts, query_lens, D ** -0.5)
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, want, **tol)


def test_paged_attention_reference_matches_dense():
    torch.manual_seed(0)
    H, KV, D, bs = 4, 2, 16, 4
    k_cache, v_cache = torch.randn(20, bs, KV, D), torch.randn(20, bs, KV, D)
    contexts, query_lens = [7, 1, 13], [3, 1, 13]
    tables, free = [], list(range(1, 20))
    random.Random(0).shuffle(free)  # blocks in no particular order
    for c in contexts:
        tables.append([free.pop() for _ in range(-(-c // bs))])
    q = torch.randn(sum(query_lens), H, D)
    got = paged_attention_reference(q, k_cache, v_cache, tables, contexts, query_lens, 0.25)
    start = 0
    for table, c, n in zip(tables, contexts, query_lens):
        k = k_cache[table].reshape(-1, KV, D)[:c].transpose(0, 1)[None]
        v = v_cache[table].reshape(-1, KV, D)[:c].transpose(0, 1)[None]
        mask = torch.arange(c)[None, :] <= torch.arange(c - n, c)[:, None]
        want = dense_attention(q[start:start + n].transpose(0, 1)[None], k, v, mask[None, None], 0.25)[0]
        torch.testing.assert_close(got[start:start + n], want.transpose(0, 1))
        start += n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_kernel_matches_reference(dtype):
    from nbtrt.kernels import paged_attention

    torch.manual_seed(0)
    H, KV, D, bs, blocks = 32, 8, 128, 16, 300
    k_cache = torch.randn(blocks, bs, KV, D, device="cuda", dtype=dtype)
    v_cache = torch.randn(blocks, bs, KV, D, device="cuda", dtype=dtype)
    contexts = [1, 17, 300, 1000, 0]  # the last: a padded row
    free = list(range(1, blocks))
    random.Random(0).shuffle(free)
    tables = [[free.pop() for _ in range(-(-c // bs))] for c in contexts]
    max_blocks = 64
    t = torch.zeros(len(contexts), max_blocks, dtype=torch.int32)
    for i, table in enumerate(tables):
        t[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
    q = torch.randn(len(contexts), H, D, device="cuda", dtype=dtype)
    got = torch.ops.nbtrt.paged_decode_attention(q, k_cache, v_cache, t.cuda(), torch.tensor(contexts, dtype=torch.int32).cuda(),
                                                 D ** -0.5, paged_attention.keys_per_split(max_blocks * bs))
    live = [i for i, c in enumerate(contexts) if c]
    want = paged_attention_reference(q[live], k_cache, v_cache, [tables[i] for i in live], [contexts[i] for i in live],
                                      [1] * len(live), D ** -0.5)
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got[live], want, **tol)
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))


def test_no_block_leaks_after_a_thousand_requests_with_cancellations_and_preemptions(tiny):
    requests = random_requests(1000, seed=3, max_prompt=12, max_new=10)
    g = random.Random(4)
    cancel_after = [g.choice([None, None, None, 0, 1, 3]) for _ in requests]  # deltas before the client leaves
    abort_from_thread = {i for i in range(len(requests)) if g.random() < 0.05}
    start = time.perf_counter()
    with nbtrt.LLM(tiny.edir, max_batch_size=8, max_num_tokens=24, block_size=4, num_blocks=16, verbose=False) as llm:
        async def one(i, prompt, new):
            await asyncio.sleep(0.0005 * (i % 50))
            n, last = 0, None
            agen = llm.generate_async(prompt, llm.sampling(max_new_tokens=new, stop_token_ids=()), request_id=f"r{i}")
            async for out in agen:
                n, last = n + 1, out
                if i in abort_from_thread and n == 1:
                    threading.Thread(target=llm.abort, args=(f"r{i}",)).start()
                if cancel_after[i] is not None and n > cancel_after[i]:
                    break  # the client leaves: closing the iterator aborts the request
            return last

        async def all_requests():
            outs = []
            for chunk in range(0, len(requests), 100):  # arrivals spread over the run
                outs += await asyncio.gather(*(one(i, p, n) for i, (p, n) in
                                               enumerate(requests[chunk:chunk + 100], start=chunk)))
            return outs

        outs = asyncio.run(all_requests())
        deadline = time.monotonic() + 10
        while (llm.stats()["running"] or llm.stats()["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = llm.stats()
        assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0
        llm.pool.check_no_leaks()
    assert stats["preemptions"] > 0
    reasons = {o.finish_reason for o in outs if o is not None and o.finished}
    assert {"length", "abort"} <= reasons
    assert time.perf_counter() - start < 60


def test_request_that_can_never_fit_is_refused_at_submit(tiny):
    with nbtrt.LLM(tiny.edir, max_batch_size=2, block_size=4, num_blocks=6, verbose=False) as llm:  # 20 tokens
        params = llm.sampling(max_new_tokens=15, stop_token_ids=())
        with pytest.raises(GenerationError, match="KV cache"):
            llm.generate([[1] * 10], params, use_tqdm=False)
        with pytest.raises(GenerationError, match="KV cache"):
            llm.generate_async([1] * 10, params)
        with pytest.raises(GenerationError, match="max_input_len"):
            llm.generate([[1] * 200], params, use_tqdm=False)
        with pytest.raises(GenerationError, match="vocabulary"):
            llm.generate([[1, 10**6]], params, use_tqdm=False)
        assert llm.stats()["waiting"] == 0
        # what fits still runs, and the pool is whole after it
        out = llm.generate([[1] * 6], llm.sampling(max_new_tokens=10, stop_token_ids=()), use_tqdm=False)[0]
        assert out.token_ids == alone(tiny.static, [1] * 6, 10)
        llm.pool.check_no_leaks()


@pytest.mark.parametrize("option, words", [
    (dict(block_size=0), "block_size=0 must be an integer >= 1"),
    (dict(max_seq_len=0), "max_seq_len=0 must be an integer >= 1"),
    (dict(num_blocks=2.5), "num_blocks=2.5 must be an integer >= 1"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization=1.5 is the fraction"),
    (dict(gpu_memory_utilization=0), "gpu_memory_utilization=0 is the fraction"),
])
def test_bad_llm_options_are_named_before_anything_loads(tiny, option, words):
    """block_size=0 was a ZeroDivisionError; max_seq_len=0 and a utilization of 1.5 or 0 were taken."""
    with pytest.raises(ValueError) as e:
        nbtrt.LLM(tiny.edir, verbose=False, **option)
    assert words in str(e.value)


def test_abort_frees_blocks_within_one_step(tiny):
    with nbtrt.LLM(tiny.edir, max_batch_size=4, block_size=4, num_blocks=64, verbose=False) as llm:
        params = llm.sampling(max_new_tokens=200, stop_token_ids=())
        other = threading.Event()
        llm.submit([5, 6, 7], params, on_output=lambda out: out.finished and other.set(), request_id="other")
        seen, at_abort, aborted = [], {}, threading.Event()

        def on_output(out):  # runs on the engine's loop thread: what it sees is exact
            seen.append((out, llm.stats()))
            if len(seen) == 5:
                at_abort.update(llm.stats())
                threading.Thread(target=llm.abort, args=("victim",)).start()  # from another thread
            if out.finished:
                aborted.set()

        llm.submit([1, 2, 3, 4, 5, 6, 7, 8, 9], params, on_output=on_output, request_id="victim")
        assert aborted.wait(10)
        last, when = seen[-1]
        assert last.finished and last.finish_reason == "abort"
        assert when["steps"] - at_abort["steps"] <= 1  # the step running when abort() came, at most
        assert when["kv_blocks_used"] < at_abort["kv_blocks_used"]  # its blocks are back already
        assert not other.is_set()  # the other request runs on
        llm.abort("other")
        deadline = time.monotonic() + 5
        while llm.stats()["kv_blocks_used"] and time.monotonic() < deadline:
            time.sleep(0.01)
        llm.pool.check_no_leaks()


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-text")
    src = tiny_hf_model("LlamaForCausalLM", root / "hf", vocab_size=49152)
    copy_tokenizer_files(nbtrt.zoo.get("smollm2-135m-instruct"), src)
    return src


def test_streamed_deltas_concatenate_to_the_text(with_tokenizer, tmp_path):
    with nbtrt.LLM(with_tokenizer, work_dir=tmp_path, max_batch_size=4, verbose=False) as llm:
        prompts = ["Hello there, how are you?", "日本語 and emoji 👋 text", "def f(x):"]
        params = llm.sampling(max_new_tokens=24, stop_token_ids=())
        full = llm.generate(prompts, params, use_tqdm=False)

        async def stream(p):
            return [out async for out in llm.generate_async(p, params)]

        async def streams():
            return await asyncio.gather(*(stream(p) for p in prompts))

        for outs, whole in zip(asyncio.run(streams()), full):
            assert outs[-1].finished and not any(o.finished for o in outs[:-1])
            assert "".join(o.delta_text for o in outs) == whole.text == outs[-1].text
            assert sum((o.delta_token_ids for o in outs), []) == whole.token_ids
        static = llm.engine
        assert [o.text for o in full] == static.generate(prompts[:1], max_new_tokens=24, stop_token_ids=()) + \
            static.generate(prompts[1:2], max_new_tokens=24, stop_token_ids=()) + \
            static.generate(prompts[2:], max_new_tokens=24, stop_token_ids=())
        # a stop string ends the text before it, streamed or not
        stop = full[0].text[3:6]
        if stop.strip():
            params = llm.sampling(max_new_tokens=24, stop_token_ids=(), stop_strings=[stop])
            out = llm.generate([prompts[0]], params, use_tqdm=False)[0]
            assert out.finish_reason == "stop" and stop not in out.text
        one = asyncio.run(_collect(llm.generate_async(prompts[0], llm.sampling(max_new_tokens=24, stop_token_ids=()),
                                                      streaming=False)))
        assert len(one) == 1 and one[0].finished and one[0].delta_text == full[0].text


async def _collect(agen):
    return [o async for o in agen]


def test_onnxruntime_engine_serves_static_batches(tiny):
    if "Llama" not in tiny.root.name:
        pytest.skip("one architecture is enough for the static path")
    edir = nbtrt.build(tiny.ckpt, tiny.root / "engine-ort", backend="onnxruntime", max_batch_size=4,
                       max_input_len=64, max_seq_len=128)
    requests = random_requests(6, seed=5)
    with nbtrt.LLM(edir, backend="onnxruntime", verbose=False) as llm:
        assert "static batches" in repr(llm)
        outs = llm.generate([p for p, _ in requests], llm.sampling(max_new_tokens=8, stop_token_ids=()), use_tqdm=False)
    for (p, _), out in zip(requests, outs):
        assert out.finish_reason == "length" and out.token_ids == alone(tiny.static, p, 8)


def test_chat_session_on_an_llm_answers_as_on_its_engine(with_tokenizer, tmp_path):
    """The chat cell and `nbtrt chat` talk to an LLM through ChatSession: the same turns, token for
    token, as on the engine alone; two conversations at once share the batch; Stop frees the blocks."""
    from nbtrt.chat import ChatSession

    with nbtrt.LLM(with_tokenizer, work_dir=tmp_path, max_batch_size=4, verbose=False) as llm:
        questions = ["Hello there, how are you?", "And what is a KV cache?"]
        on_llm, on_engine = (ChatSession(x, system="Be brief.", max_new_tokens=12, stop_token_ids=())
                             for x in (llm, llm.engine))
        for q in questions:
            assert "".join(on_llm.send(q)) == "".join(on_engine.send(q))
        assert [r.token_ids for r in on_llm.replies] == [r.token_ids for r in on_engine.replies]
        assert [r.finish for r in on_llm.replies] == ["length", "length"]
        assert on_llm.reply.stats.new_tokens == 12 and on_llm.reply.stats.ttft_s > 0

        answers = {}

        def converse(name):
            session = ChatSession(llm, max_new_tokens=12, stop_token_ids=())
            answers[name] = "".join(session.send(name))

        threads = [threading.Thread(target=converse, args=(q,)) for q in questions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for q in questions:
            alone_session = ChatSession(llm.engine, max_new_tokens=12, stop_token_ids=())
            assert answers[q] == "".join(alone_session.send(q))

        cancel, session = threading.Event(), ChatSession(llm, max_new_tokens=200, stop_token_ids=())
        deltas = session.send(questions[0], cancel=cancel)
        next(deltas)
        cancel.set()
        rest = list(deltas)
        assert session.reply.finish == "stopped" and len(session.reply.token_ids) < 200, rest
        llm.pool.check_no_leaks()
        with pytest.raises(GenerationError):  # bad input raises at send, before anything is queued
            ChatSession(llm).send("hi", max_new_tokens=0)
