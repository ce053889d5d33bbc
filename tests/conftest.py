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


@pytest.fixture(scope="session")
def docs_cache(neox_dir, text_dir, tmp_path_factory) -> Path:
    """A small cache of short documents (2-7 windows of 16 tokens, each preceded by EOS: ~60 special
    tokens, keep=False) in 4 write blocks of 64 windows: held-out documents and special tokens show."""
    from harvest.run import harvest
    from harvest.spec import CacheSpec

    out = tmp_path_factory.mktemp("docs_cache") / "cache"
    spec = CacheSpec(
        model=str(neox_dir),
        dataset=str(text_dir),
        out=str(out),
        context=16,
        tokens=16 * 240,
        chunk_tokens=128,
        shard_tokens=256,
        shuffle_tokens=1024,
        batch_size=16,
    )
    harvest(spec, show_progress=False)
    return out


@pytest.fixture(scope="session")
def s3_endpoint():
    """A REAL S3 protocol server (moto) in this process on a free loopback port; clients find it through the
    standard AWS environment variables, as they would find MinIO or R2."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ALLOW_HTTP": "true",
        "MLSAE_STORE_RETRY_SECONDS": "5",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_endpoint, request) -> str:
    """A fresh, empty bucket for one test: 's3://NAME'."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"
