"""`platform/` is a source root: the stdlib `platform` module must not be shadowed."""
import platform
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_platform_is_stdlib():
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(platform.__file__).resolve().parent == stdlib
    assert callable(platform.python_version)


def test_no_platform_package_init():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_robustseg_imports_from_source_root():
    import robustseg

    assert Path(robustseg.__file__).resolve().parent == (REPO / "platform" / "robustseg").resolve()
