"""A whole benchmark: build the runners for a model, measure each on each workload, write the JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._io import write_json
from ..convert import convert, hf_config, resolve_source
from ..engine import BACKENDS, _ensure_backends, build, load
from ..model import TORCH_DTYPES
from ..quantize import quantize
from .runners import SHORT_DTYPE, Runner, engine_runner, hf_runner, machine, measure, skipped
from .workloads import Workload, fixed


def run_all(runners: list[Runner], workloads: list[Workload], vocab_size: int, *, model: str = "",
            warmup: int = 1, progress: bool = True) -> dict:
    """Measure every runner on every workload; skipped and failed runners are kept with their reason."""
    results = []
    jobs = [(r, w) for r in runners for w in workloads]
    for r, w in tqdm(jobs, desc="bench", disable=not progress):
        results.append(measure(r, w, vocab_size, warmup=warmup))
    return {"model": model, "machine": machine(), "workloads": [{"name": w.name, "batch_size": w.batch_size,
            "repeats": w.repeats, "lengths": w.lengths} for w in workloads], "results": results}


# ------------------------------------------------------------------------------ building runners
class Checkpoints:
    """The nbtrt checkpoints of one model under ``work``, each made on first use: the converted one
    (precision = the short name of ``dtype``, e.g. "fp32") and one per ``nbtrt.quantize`` format.

    >>> ckpts = Checkpoints("smollm2-135m-instruct", "work/bench", "float32")  # doctest: +SKIP
    >>> ckpts("int4_wo")  # converts, then quantizes  # doctest: +SKIP
    PosixPath('work/bench/ckpt-int4_wo')
    """

    def __init__(self, src: str | Path, work: str | Path, dtype: str = "float32"):
        self.src, self.work, self.dtype, self.short = src, Path(work), dtype, SHORT_DTYPE[dtype]
        self.made: dict[str, Path] = {}

    def __call__(self, precision: str) -> Path:
        if precision not in self.made:
            if precision == self.short:
                self.made[precision] = convert(self.src, self.work / f"ckpt-{precision}", dtype=self.dtype,
                                               overwrite=True)
            else:
                self.made[precision] = quantize(self(self.short), self.work / f"ckpt-{precision}", precision,
                                                overwrite=True)
        return self.made[precision]


@dataclass(frozen=True)
class EngineSpec:
    """One nbtrt engine to measure, as data: the row's ``name``, the ``backend``, the checkpoint's
    ``precision`` (a :class:`Checkpoints` key) and the options passed to ``nbtrt.build`` (``build``)
    and ``nbtrt.load`` (``load``). Another flavour of an engine is one more spec, not more code.

    >>> EngineSpec("nbtrt-onnxruntime", "onnxruntime", "int4_wo", load={"threads": 2})
    EngineSpec(name='nbtrt-onnxruntime', backend='onnxruntime', precision='int4_wo', build={}, load={'threads': 2})
    """

    name: str
    backend: str
    precision: str
    build: dict = field(default_factory=dict)
    load: dict = field(default_factory=dict)


def engine_spec_runner(spec: EngineSpec, checkpoints: Checkpoints, *, device: str = "cpu", max_batch_size: int = 8,
                       max_input_len: int = 512, max_seq_len: int = 1024,
                       work_dir: str | Path = "work/bench") -> Runner:
    """Build and load the engine ``spec`` describes (under ``work_dir/engine-<name>-<precision>``) and
    return its runner; skipped where the backend cannot run here, failed (with the error) where the
    build or load raises. ``info`` records the build options engine.json holds and the load options.

    >>> r = engine_spec_runner(EngineSpec("nbtrt-torch", "torch", "fp32"), Checkpoints("smollm2-135m-instruct", "w"))  # doctest: +SKIP
    """
    _ensure_backends()
    cls = BACKENDS.get(spec.backend)
    reason = "backend not registered in this nbtrt" if cls is None else cls.available()
    if reason:
        return skipped(spec.name, spec.precision, reason)
    load_options = {**({"device": device} if spec.backend == "torch" else {}), **spec.load}
    try:
        edir = build(checkpoints(spec.precision), Path(work_dir) / f"engine-{spec.name}-{spec.precision}",
                     backend=spec.backend, max_batch_size=max_batch_size, max_input_len=max_input_len,
                     max_seq_len=max_seq_len, overwrite=True, **spec.build)
        engine = load(edir, **load_options)
    except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. a format this backend lacks
        return Runner(spec.name, spec.precision, "-", 0, failed=f"{type(e).__name__}: {e}")
    runner = engine_runner(engine, name=spec.name, precision=spec.precision)
    runner.info.update(build_options=engine.manifest.get("options", {}),
                       load_options={k: v for k, v in load_options.items() if k != "device"})
    return runner


RUNNERS = ("hf-eager", "hf-compile", "nbtrt-torch", "nbtrt-torch-compiled", "nbtrt-onnxruntime", "nbtrt-tensorrt")


def make_runners(src: str | Path, names: list[str] | tuple[str, ...] = RUNNERS, *, device: str | None = None,
                 dtype: str = "float32", precisions: list[str] | tuple[str, ...] = (),
                 quantized_runners: list[str] | tuple[str, ...] | None = None, skip: dict[str, str] | None = None,
                 max_batch_size: int = 8, max_input_len: int = 512, max_seq_len: int = 1024,
                 work_dir: str | Path = "work/bench") -> list[Runner]:
    """Runners for a HF model (zoo name or directory): HF itself, and every listed nbtrt backend built
    from the converted checkpoint in ``dtype`` and from each quantized checkpoint in ``precisions``
    (``nbtrt.quantize`` formats, e.g. "int8_wo", "int4_wo"), for the runners in ``quantized_runners``
    (default: every nbtrt runner). Unavailable ones come back skipped, and so do those in ``skip``
    (runner -> the reason it is not run); one whose build or load raises comes back failed."""
    from .._io import load_hf_model  # trust_remote_code=False, auto_map refused

    _ensure_backends()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    src = resolve_source(src)
    work = Path(work_dir)
    unknown = sorted(set(names) - set(RUNNERS))
    if unknown:
        raise ValueError(f"unknown runners {unknown}; known: {list(RUNNERS)}")
    short = SHORT_DTYPE[dtype]
    checkpoint = Checkpoints(src, work, dtype)
    limits = {"max_batch_size": max_batch_size, "max_input_len": max_input_len, "max_seq_len": max_seq_len}

    runners: list[Runner] = []
    hf = None
    for name in names:
        if skip and name in skip:
            runners.append(skipped(name, short, skip[name]))
            continue
        if name.startswith("hf-"):
            hf = hf or load_hf_model(src, dtype=TORCH_DTYPES[dtype]).to(device).eval()
            runners.append(hf_runner(hf, compile=name == "hf-compile", max_batch_size=max_batch_size,
                                     pad_token_id=_pad_id(hf)))
            continue
        backend = name.removeprefix("nbtrt-").removesuffix("-compiled")
        cls = BACKENDS.get(backend)
        reason = "backend not registered in this nbtrt" if cls is None else cls.available()
        quantized = quantized_runners is None or name in quantized_runners
        for prec in (short, *(precisions if quantized else ())):
            if reason:
                runners.append(skipped(name, prec, reason))
                continue
            opts = {"compile": name.endswith("-compiled")} if backend == "torch" else {}
            runners.append(engine_spec_runner(EngineSpec(name, backend, prec, build=opts), checkpoint,
                                              device=device, work_dir=work, **limits))
    return runners


def _pad_id(model) -> int:
    gen = getattr(model, "generation_config", None)
    for v in (getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None)):
        if v is not None:
            return int(v[0] if isinstance(v, list) else v)
    return 0


def bench(src: str | Path, runners: list[str] | tuple[str, ...] = RUNNERS, workloads: list[Workload] | None = None,
          *, device: str | None = None, dtype: str = "float32", precisions: tuple[str, ...] = (),
          quantized_runners: tuple[str, ...] | None = None, skip: dict[str, str] | None = None,
          max_batch_size: int = 8, work_dir: str | Path = "work/bench", out: str | Path | None = None,
          warmup: int = 1) -> dict:
    """Build the runners for ``src`` and measure them; write JSON to ``out`` when given. Engines are
    built with the limits the workloads need (max batch, longest prompt + output).

    >>> r = bench("smollm2-135m-instruct", ["hf-eager", "nbtrt-torch"], [fixed(1, 32, 16)])  # doctest: +SKIP
    """
    workloads = workloads or [fixed(1, 128, 64)]
    max_batch_size = max([max_batch_size] + [w.batch_size or 0 for w in workloads])
    max_input = max(n for w in workloads for n, _ in w.lengths)
    # static batches pad prompts to the longest and run to the longest output
    max_seq_len = max_input + max(m for w in workloads for _, m in w.lengths)
    built = make_runners(src, runners, device=device, dtype=dtype, precisions=precisions,
                         quantized_runners=quantized_runners, skip=skip, max_batch_size=max_batch_size,
                         max_input_len=max_input, max_seq_len=max_seq_len, work_dir=work_dir)
    vocab = int(hf_config(resolve_source(src))["vocab_size"])
    result = run_all(built, workloads, vocab, model=str(src), warmup=warmup)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
    return result
