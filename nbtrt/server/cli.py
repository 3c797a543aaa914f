"""``nbtrt serve``: the OpenAI-compatible server in the foreground (Ctrl-C stops it).
Kept apart from the app so that ``nbtrt --help`` does not import the web stack."""
from __future__ import annotations

import os


def add_cli(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over OpenAI's HTTP API (completions, chat, streaming, /metrics)")
    p.add_argument("model", help="zoo name, HF model directory, nbtrt checkpoint or engine directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need --allow-remote)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (warns)")
    p.add_argument("--api-key", default=os.environ.get("NBTRT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $NBTRT_API_KEY; unset: no key)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait beyond a full batch before 429 (default: 8 batches)")
    p.add_argument("--backend", default="torch", help="torch (in-flight batching) | onnxruntime | tensorrt")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: sized from memory)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over N rank processes (static batches; CPU: Gloo, N GPUs: NCCL)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run_serve)


def run_serve(args) -> None:
    from .run import make_server

    llm_options = {"backend": args.backend, "max_batch_size": args.max_batch_size}
    llm_options.update({k: v for k, v in (("max_seq_len", args.max_seq_len), ("num_blocks", args.num_blocks))
                        if v is not None})
    if args.tensor_parallel_size != 1:  # validated by nbtrt.LLM, with the fix in its message
        llm_options["tensor_parallel_size"] = args.tensor_parallel_size
    handle = make_server(args.model, host=args.host, port=args.port, api_key=args.api_key,
                         allow_remote=args.allow_remote, served_model_name=args.served_model_name,
                         max_queue=args.max_queue, log_level=args.log_level, **llm_options)
    name = handle.app.state.server.model_name
    print(f"nbtrt serve: {name} at {handle.url} (OpenAI base URL; Ctrl-C stops)", flush=True)
    try:
        handle._server.run(sockets=[handle._sock])  # the main thread: uvicorn handles Ctrl-C / SIGTERM
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
        print("nbtrt serve: stopped", flush=True)
    finally:
        handle._sock.close()
        handle.llm.shutdown()
