"""Shared fixtures: one local Ray per test session, a real S3 server on 127.0.0.1,
and a clean ``memory://`` filesystem per test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One in-process local Ray for the whole test session.

    Declares 8 logical CPUs so actors can be scheduled on a 2-core CI machine, and exports
    metrics every second (default 10 s) so a test can read them on the Prometheus endpoint.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, namespace="orchestrator-tests",
                 _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto_server) on 127.0.0.1; yields its endpoint URL."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto_server exited before accepting connections")
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"moto_server did not listen on {endpoint} within 30 s")
    yield endpoint
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def s3_options_for(endpoint: str) -> dict:
    """``storage_options`` for s3fs pointing at the test server at ``endpoint``."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }


def new_bucket(options: dict) -> str:
    """Create a fresh bucket on the test server; its ``s3://`` URL."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
        aws_access_key_id=options["key"], aws_secret_access_key=options["secret"],
    )
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)  # us-east-1: no LocationConstraint allowed
    return f"s3://{name}"


@pytest.fixture
def s3_options(s3_server):
    """``storage_options`` for s3fs pointing at the test server."""
    return s3_options_for(s3_server)


@pytest.fixture
def s3_bucket(s3_options):
    """A fresh bucket; yields its ``s3://`` URL."""
    yield new_bucket(s3_options)


@pytest.fixture
def memory_root():
    """A unique ``memory://`` directory, removed afterwards."""
    import fsspec

    root = f"memory://t-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["local", "memory", "s3"])
def any_root(request, tmp_path):
    """A checkpoint root and its storage_options, for each backend.

    Yields ``(root, storage_options)``; the same round-trip tests run on all three.
    """
    if request.param == "local":
        yield str(tmp_path / "ckpt"), None
    elif request.param == "memory":
        yield request.getfixturevalue("memory_root"), None
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield bucket + "/ckpt", request.getfixturevalue("s3_options")
