"""A real `flashmoe serve` process on a free loopback port, serving a tiny random model.

The model's weights are random, so its text is gibberish; what the tests check is the protocol,
the structure the grammar enforces, and that concurrent clients never mix up their tokens."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import build_hf_model

API_KEY = "test-key"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A converted tiny model with a 4096-token context: tool definitions take ~1000 byte-level tokens."""
    from flashmoe.convert import convert

    hf = tmp_path_factory.mktemp("tiny4k_hf")
    build_hf_model("text", hf, max_position_embeddings=4096)
    out = tmp_path_factory.mktemp("tiny4k") / "model"
    convert(hf, out, bits=16)
    return out


@pytest.fixture(scope="session")
def engine(tiny_model):
    """The tiny model in this process, for tests of the engine under the server; one thread, so
    that sums round alike from run to run (the adaptive count follows the machine's load)."""
    from flashmoe.engine import Engine, EngineConfig

    return Engine(tiny_model, EngineConfig(threads=1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str, api_key: str | None = API_KEY) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "flashmoe", "serve", "--model", str(model), "--port", str(self.port), *args]
        # One thread: the tiny model gains nothing from more, and they stall when the machine is busy.
        env = {k: v for k, v in os.environ.items() if k != "FLASHMOE_API_KEY"} | {"OMP_NUM_THREADS": "1"}
        if api_key is not None:
            env["FLASHMOE_API_KEY"] = api_key
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flashmoe serve exited early:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("flashmoe serve did not answer /health within 60 s")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def server(tiny_model):
    # fp32: the scheduler batches concurrent requests, and a batch's bf16 matmuls round differently
    # from one sequence's, which can flip a greedy token of this chaotic tiny model; fp32 cannot
    # (tests compare concurrent answers with each prompt's answer alone, token for token)
    s = Server(tiny_model, "--max-body", "1M", "--dtype", "float32")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def keyless_server(tiny_model):
    """The default setup: no API key, on loopback."""
    s = Server(tiny_model, api_key=None)
    yield s
    s.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
