"""The built wheel: configs/ installs as maxlm.configs (no generic top-level `configs`), every package is in it,
and the optional features are extras. Built from a copy of the sources, so the checkout gets no build/ litter."""

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("maxlm", "kernels_pallas", "data_pipelines")
EXTRAS = {"serve": {"fastapi", "uvicorn", "httpx"}, "curate": {"py3langid", "ftfy"}, "plot": {"matplotlib"},
          "lmeval": {"lm_eval"}}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  """The wheel `pip wheel --no-deps --no-build-isolation` builds from the repository's sources."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy2(ROOT / name, src / name)
  for name in (*TOP_LEVEL, "configs"):
    shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  [path] = (tmp / "dist").glob("maxlm-*.whl")
  return path


def _names(wheel: Path) -> list[str]:
  with zipfile.ZipFile(wheel) as zf:
    return zf.namelist()


def _metadata(wheel: Path):
  with zipfile.ZipFile(wheel) as zf:
    [meta] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(zf.read(meta).decode())


def test_configs_install_inside_maxlm_and_nothing_generic_at_the_top(wheel):
  names = _names(wheel)
  tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert tops == set(TOP_LEVEL)  # no top-level configs/ (or tests/, scripts/)
  packaged = {n.removeprefix("maxlm/configs/") for n in names if n.startswith("maxlm/configs/")}
  assert packaged == {p.name for p in (ROOT / "configs").glob("*.py")}
  assert {"base.py", "tiny.py", "llama3_8b.py"} <= packaged


def test_every_package_directory_is_in_the_wheel(wheel):
  """pyproject.toml lists the packages: a new package directory missing there would be left out of installs."""
  names = set(_names(wheel))
  for top in TOP_LEVEL:
    for init in (ROOT / top).rglob("__init__.py"):
      rel = init.relative_to(ROOT).as_posix()
      assert rel in names, f"{rel}: add its package to [tool.setuptools] packages in pyproject.toml"
      for module in init.parent.glob("*.py"):
        assert module.relative_to(ROOT).as_posix() in names, module


def test_optional_features_are_extras_and_unused_packages_are_not_dependencies(wheel):
  meta = _metadata(wheel)
  requirements = meta.get_all("Requires-Dist")
  core = {r.split(";")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower() for r in requirements
          if "extra ==" not in r}
  assert not core & {"chex", "tensorstore", *set().union(*EXTRAS.values())}
  assert {"jax", "flax", "orbax-checkpoint", "grain"} <= core

  def extra(name: str) -> set[str]:
    return {r.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("[")[0].strip().lower()
            for r in requirements if f'extra == "{name}"' in r}

  assert set(meta.get_all("Provides-Extra")) >= {*EXTRAS, "all", "dev"}
  for name, packages in EXTRAS.items():
    assert extra(name) == packages
  [everything] = [r for r in requirements if 'extra == "all"' in r]
  assert extra("all") == {"maxlm"} and set(everything.split("[")[1].split("]")[0].split(",")) == set(EXTRAS)
  assert {"maxlm", "pytest", "scipy", "ruff", "nbclient", "nbformat", "ipykernel"} <= extra("dev")


def test_the_installed_wheel_loads_packaged_configs_by_name_and_path(wheel, tmp_path):
  """Installed (not from the checkout), `--config=tiny_moe` finds maxlm/configs and its sibling imports work."""
  target = tmp_path / "site"
  with zipfile.ZipFile(wheel) as zf:  # a pure-Python wheel installs by unpacking (pip install --target, faster)
    zf.extractall(target)
  code = ("import maxlm.config as c, maxlm.configs as p; cfg = c.load_config('tiny_moe'); "
          "print(c.CONFIG_DIR, p.__file__, cfg.model.num_experts, sep='\\n')")
  env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the checkout's editable install
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=env)
  assert out.returncode == 0, out.stderr
  config_dir, package_file, experts = out.stdout.split()
  assert Path(config_dir) == target / "maxlm" / "configs" and Path(package_file).parent == Path(config_dir)
  assert experts == "4"
