"""How much of a multi-turn chat's prompt the prefix cache serves (docs/serving.md's figure): a tiny
random-weight Llama with SmolLM2's tokenizer and chat template, three turns through ChatSession on
nbtrt.LLM, 20 greedy tokens each; per turn the prompt length and the prompt tokens taken from the cache.
Random weights answer gibberish that re-tokenizes differently, so a real model shares at least as much.

    python benchmarks/experiments/prefix_cache_chat.py      # CPU, ~20 s; JSON to benchmarks/results/
"""
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nbtrt  # noqa: E402
from nbtrt import bench as B  # noqa: E402
from nbtrt._io import copy_tokenizer_files  # noqa: E402
from nbtrt.chat import ChatSession, apply_chat_template  # noqa: E402
from nbtrt.testing import tiny_hf_model  # noqa: E402

root = Path(tempfile.mkdtemp(prefix="nbtrt-prefix-"))
src = tiny_hf_model("LlamaForCausalLM", root / "hf", vocab_size=49152)
copy_tokenizer_files(nbtrt.zoo.get("smollm2-135m-instruct"), src)
turns = []
with nbtrt.LLM(src, work_dir=root, max_batch_size=2, verbose=False) as llm:
    chat = ChatSession(llm, system="You are a helpful assistant who answers briefly and clearly.", max_new_tokens=20)
    for question in ["What is a KV cache?", "Why does it make decoding faster?", "Thanks! One more question please."]:
        before = llm.stats()["prefix_cached_tokens"]
        prompt = len(apply_chat_template(llm.tokenizer, chat.messages(question)))
        "".join(chat.send(question))
        turns.append({"question": question, "prompt_tokens": prompt,
                      "from_cache": llm.stats()["prefix_cached_tokens"] - before})
        print(turns[-1])
out = Path(__file__).resolve().parents[1] / "results" / f"prefix_cache_chat_cpu_{datetime.date.today()}.json"
out.write_text(json.dumps({"machine": B.machine(), "block_size": 16, "turns": turns}, indent=1))
print(f"wrote {out}")
