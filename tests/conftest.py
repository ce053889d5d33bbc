import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_neox, write_text_folder


@pytest.fixture(scope="session")
def neox_dir(tmp_path_factory) -> Path:
    return make_neox(tmp_path_factory.mktemp("models") / "tiny-neox")


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    return write_text_folder(tmp_path_factory.mktemp("data") / "docs")
