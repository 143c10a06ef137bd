import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

import veloxcore  # noqa: E402,F401  (preloads OpenBLAS before anything imports mlx)


@pytest.fixture(scope="session", autouse=True)
def isolated_user_dirs(tmp_path_factory):
    """Converted-model cache, chat history and Qt settings go to temporary folders."""
    os.environ["VELOX_CACHE_DIR"] = str(tmp_path_factory.mktemp("velox-cache"))
    os.environ["VELOX_DATA_DIR"] = str(tmp_path_factory.mktemp("velox-data"))  # chat history
    settings_dir = tmp_path_factory.mktemp("qt-settings")
    try:
        from PySide6.QtCore import QSettings

        QSettings.setDefaultFormat(QSettings.Format.IniFormat)
        QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(settings_dir))
    except ImportError:
        pass
    yield


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    return veloxcore.load("default")
