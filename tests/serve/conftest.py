"""Fixtures of the server tests: a tiny random model served on loopback, adapters in a folder."""

import copy

import pytest
import torch

from lora_helpers import make_adapter
from tuneforge.adapters.manager import AdapterSet
from tuneforge.data.conversation import Message
from tuneforge.serve import ServeOptions, Server


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny models gain nothing from more threads
    yield
    torch.set_num_threads(before)


@pytest.fixture
def adapters_dir(tmp_path, tiny_model):
    root = tmp_path / "adapters"
    make_adapter(tiny_model, root / "alpha", ["q_proj", "v_proj"], 4, seed=1, std=0.5)
    make_adapter(tiny_model, root / "beta", "all-linear", 2, seed=2, std=0.5)
    return root


@pytest.fixture
def gamma(tmp_path, tiny_model):
    """A third adapter, outside the served directory."""
    return make_adapter(tiny_model, tmp_path / "elsewhere" / "gamma", ["up_proj", "o_proj"], 8, seed=3, std=0.5)


@pytest.fixture
def reference(tiny_model, tiny_tokenizer, adapters_dir, gamma):
    """Greedy outputs computed directly with the library: reference(model_name, prompt) -> text."""
    aset = AdapterSet(copy.deepcopy(tiny_model), tiny_tokenizer)
    for name in ("alpha", "beta"):
        aset.load(name, adapters_dir / name)
    aset.load("gamma", gamma)

    def run(name, prompt, max_tokens=8):
        aset.activate({} if name == "base" else name)
        if isinstance(prompt, list):
            prompt = [Message(m["role"], m["content"]) for m in prompt]
        return aset.generate([prompt], max_new_tokens=max_tokens)[0]

    return run


@pytest.fixture
def start_server(tiny_model_dir, adapters_dir):
    """start_server(**options) -> a running Server over ``adapters_dir``, closed after the test."""
    servers = []

    def start(**options) -> Server:
        # scan_interval_s=0: no background rescans, so changes are seen through request-time rescans only
        options = {"model": str(tiny_model_dir), "port": 0, "scan_interval_s": 0, **options}
        servers.append(Server(ServeOptions(adapters=str(adapters_dir), **options)))
        return servers[-1].start()

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def connect():
    """connect(server, api_key) -> the official openai client for that server (no retries)."""
    openai = pytest.importorskip("openai")

    def client(server: Server, api_key: str = "unused"):
        return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    return client
