"""Faults against a real loopback server: bad adapter folders, updates under load, slow clients, disconnects."""

import json
import os
import select
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file

from conftest import build_tiny_model
from lora_helpers import make_adapter
from tuneforge.errors import TuneforgeError
from tuneforge.serve import ServeOptions, Server, serve

openai = pytest.importorskip("openai")

PROMPT = "Hello world."  # alpha, beta and gamma answer it differently
N = 8


def http(server, raw: bytes, timeout: float = 30) -> tuple[int | None, dict | None]:
    """Send ``raw`` bytes; (status, JSON body) of the answer, (None, None) if the server just closed."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> tuple[int | None, dict | None]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(headers[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body)


def post(path: str, body: bytes | str) -> bytes:
    body = body.encode() if isinstance(body, str) else body
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def trickle(sock: socket.socket, data: bytes, every_s: float) -> bool:
    """Send ``data`` a byte at a time; True when the server answered or closed before all of it was sent."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return True
        time.sleep(every_s)
        if select.select([sock], [], [], 0)[0]:  # an answer, or the end of the connection
            return True
    return False


def bad_adapters(root, tiny_model, tiny_tokenizer) -> dict[str, str]:
    """Write malformed adapter folders into ``root``; {name: a word their error must contain}."""
    def config_of(name, **changes):
        path = root / name / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    cases = {}
    for name, change, word in (("0_targets", {"target_modules": 5}, "target_modules"),
                               ("zz_rank_pattern", {"rank_pattern": 5}, "rank_pattern=5"),
                               ("zz_peft_type", {"peft_type": "IA3"}, "peft_type")):
        shutil.copytree(root / "alpha", root / name)
        config_of(name, **change)
        cases[name] = word
    shutil.copytree(root / "alpha", root / "0_scalars")
    save_file({f"base_model.model.model.layers.0.self_attn.q_proj.lora_{p}.weight": torch.tensor(1.0)
               for p in "AB"}, str(root / "0_scalars" / "adapter_model.safetensors"))
    cases["0_scalars"] = "shape []"
    shutil.copytree(root / "alpha", root / "bad_json")
    (root / "bad_json" / "adapter_config.json").write_text("{not json")
    cases["bad_json"] = "not valid JSON"
    shutil.copytree(root / "alpha", root / "no_weights")
    (root / "no_weights" / "adapter_model.safetensors").unlink()
    cases["no_weights"] = "missing"
    shutil.copytree(root / "alpha", root / "no_config")
    (root / "no_config" / "adapter_config.json").unlink()
    cases["no_config"] = "missing"
    shutil.copytree(root / "alpha", root / "truncated")
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases["truncated"] = "safetensors"
    make_adapter(build_tiny_model(len(tiny_tokenizer), hidden=32), root / "other_base", ["q_proj"], 4, seed=5)
    cases["other_base"] = "different base model"
    return cases


def test_bad_adapter_folders_are_listed_and_the_rest_serve(start_server, connect, adapters_dir, gamma, reference,
                                                           tiny_model, tiny_tokenizer, caplog):
    cases = bad_adapters(adapters_dir, tiny_model, tiny_tokenizer)
    server = start_server()
    client = connect(server)
    for _ in range(3):  # repeated rescans neither raise nor log again
        server.registry.sync()
    status, listing = http(server, get("/v1/models"))
    assert status == 200
    assert [m["id"] for m in listing["data"]] == [server.options.model, "alpha", "beta"]
    failed = {f["id"]: f["error"] for f in listing["failed"]}
    assert sorted(failed) == sorted(cases)
    for name, word in cases.items():
        assert word in failed[name], (name, failed[name])
        assert str(adapters_dir) not in failed[name]
        logged = [r for r in caplog.records if f"adapter {name} not served" in r.getMessage()]
        assert len(logged) == 1, name
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="bad_json", prompt=PROMPT, max_tokens=N, temperature=0)
    assert "not valid JSON" in str(e.value) and str(adapters_dir) not in str(e.value)
    for model in ("alpha", "beta"):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
        assert r.choices[0].text.strip() == reference(model, PROMPT)
    # A good adapter rewritten while the bad ones stay is reloaded; a bad one that is fixed is served.
    for name in ("alpha", "bad_json"):
        shutil.rmtree(adapters_dir / name)
        shutil.copytree(gamma, adapters_dir / name)
        r = client.completions.create(model=name, prompt=PROMPT, max_tokens=N, temperature=0)
        assert r.choices[0].text.strip() == reference("gamma", PROMPT)
    assert "bad_json" not in server.registry.errors


@pytest.mark.parametrize("how", ["in_place", "folder_swap"])
def test_rewrite_under_load_finishes_queued_requests_on_the_old_weights(how, start_server, connect, adapters_dir,
                                                                         gamma, reference):
    server = start_server()
    client = connect(server)

    def ask(_):
        return client.completions.create(model="alpha", prompt=PROMPT, max_tokens=N, temperature=0).choices[0].text

    with ThreadPoolExecutor(25) as pool:
        with server.adapter_set.lock:  # the batcher cannot start a batch: the requests queue up
            queued = [pool.submit(ask, i) for i in range(24)]
            for _ in range(1200):
                if server.registry.in_use("alpha") == 24:
                    break
                time.sleep(0.05)
            assert server.registry.in_use("alpha") == 24
            if how == "in_place":
                for f in ("adapter_config.json", "adapter_model.safetensors"):
                    shutil.copyfile(gamma / f, adapters_dir / "alpha" / f)
            else:
                shutil.copytree(gamma, adapters_dir / ".alpha.new")
                os.rename(adapters_dir / "alpha", adapters_dir / ".alpha.old")
                os.rename(adapters_dir / ".alpha.new", adapters_dir / "alpha")
                shutil.rmtree(adapters_dir / ".alpha.old")
            server.registry.sync()  # the same thread holds the lock: the new version loads beside the old
            later = pool.submit(ask, 24)
            for _ in range(1200):
                if server.registry.in_use("alpha") == 25:
                    break
                time.sleep(0.05)
        answers = [f.result() for f in queued]  # any 404 "was unloaded" would raise here
        assert [a.strip() for a in answers] == [reference("alpha", PROMPT)] * 24
        assert later.result().strip() == reference("gamma", PROMPT) != reference("alpha", PROMPT)
    for _ in range(600):  # the old version is freed once its last request has been answered
        if len([n for n in server.adapter_set.names if n.startswith("alpha/")]) == 1:
            break
        time.sleep(0.05)
    assert len([n for n in server.adapter_set.names if n.startswith("alpha/")]) == 1


def test_slow_and_short_bodied_clients_time_out(start_server, connect):
    server = start_server(read_timeout_s=1)
    body = json.dumps({"model": "alpha", "prompt": PROMPT, "max_tokens": N}).encode()
    head = post("/v1/completions", body)[: -len(body)]
    # A Content-Length longer than the body, the connection left open: 408, the connection closed.
    status, answer = http(server, head.replace(str(len(body)).encode(), str(len(body) + 50).encode()) + body)
    assert status == 408 and answer["error"]["code"] == "request_timeout"
    # The same body followed by the end of the input: 400 naming the byte counts.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.replace(str(len(body)).encode(), str(len(body) + 50).encode()) + body)
        sock.shutdown(socket.SHUT_WR)
        status, answer = read_answer(sock)
    assert status == 400 and f"after {len(body)} of the {len(body) + 50} bytes" in answer["error"]["message"]
    # One byte every 0.2 s, in the body and in the headers: the request's deadline ends it.
    for prefix, rest in ((head, body), (b"", head)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(prefix)
            assert trickle(sock, rest, every_s=0.2)
    # An idle connection is closed, and the server still answers.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        assert sock.recv(1) == b""
    assert connect(server).completions.create(model="alpha", prompt=PROMPT, max_tokens=N).choices


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_cancels_generation(stream, start_server, connect, reference):
    server = start_server(max_tokens_limit=64)
    jobs, seen, started = [], {}, threading.Event()
    submit = server.batcher.submit
    server.batcher.submit = lambda batch: (jobs.extend(batch), submit(batch))

    def hold_first_step(module, args, kwargs):
        seen["steps"] = seen.get("steps", 0) + 1
        if seen["steps"] == 1:  # the prefill waits until the server notices the client left
            started.set()
            seen["cancelled"] = jobs[-1].cancelled.wait(30)

    hook = server.adapter_set.model.register_forward_pre_hook(hold_first_step, with_kwargs=True)
    try:
        body = json.dumps({"model": "alpha", "prompt": PROMPT, "max_tokens": 64, "temperature": 0,
                           "stream": stream})
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(post("/v1/completions", body))
            assert started.wait(30)
        r = connect(server).completions.create(model="alpha", prompt=PROMPT, max_tokens=N, temperature=0)
    finally:
        hook.remove()
    assert seen["cancelled"] is True
    assert r.choices[0].text.strip() == reference("alpha", PROMPT)
    assert seen["steps"] < 64 + N  # the abandoned row stopped after its first token


def test_out_of_range_numbers_and_deep_nesting_are_400(start_server, connect):
    server = start_server(max_tokens_limit=64)
    client = connect(server)
    for seed in (2**63, 2**64, -(2**63) - 1):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="alpha", prompt=PROMPT, max_tokens=N, temperature=0.5, seed=seed)
        assert e.value.body["param"] == "seed"
    for seed in (2**63 - 1, -(2**63)):
        assert client.completions.create(model="alpha", prompt=PROMPT, max_tokens=N, temperature=0.5,
                                         seed=seed).choices
    cases = {  # raw bodies: (JSON text, the param named or a word of the message)
        '{"model": "alpha", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}": "too deeply",
        '{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": '
        + "[" * 500 + "]" * 500 + "}": "max_tokens",
        '{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}': "temperature",
        '{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}': "top_p",
        '{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + "0" * 30 + "}":
            "max_tokens",
        '{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "seed": 1' + "0" * 5000 + "}":
            "not valid JSON",
        '{"model": "alpha", "messages": [{"role": ["user"], "content": "hi"}]}': "messages",
    }
    for raw, named in cases.items():
        status, answer = http(server, post("/v1/chat/completions", raw))
        assert status == 400, (raw[:80], answer)
        assert named in (answer["error"]["param"] or "") or named in answer["error"]["message"], raw[:80]


def test_empty_api_key_is_refused(tiny_model_dir, adapters_dir):
    for key in ("", "  "):
        options = ServeOptions(model=str(tiny_model_dir), adapters=str(adapters_dir), port=0, api_key=key)
        with pytest.raises(TuneforgeError, match="API key"):
            Server(options)  # fails fast: `serve` below would serve forever if the key were accepted
        with pytest.raises(TuneforgeError, match="API key"):
            serve(options)


def test_404_lists_models_without_the_adapters_path(start_server, connect, adapters_dir, gamma):
    server = start_server()
    (adapters_dir / "linked").symlink_to(gamma, target_is_directory=True)
    for model in ("nope", "linked"):
        with pytest.raises(openai.NotFoundError) as e:
            connect(server).completions.create(model=model, prompt=PROMPT, max_tokens=N)
        message = e.value.body["message"]
        assert all(m in message for m in (server.options.model, "alpha", "beta"))
        assert str(adapters_dir) not in message and str(adapters_dir.resolve()) not in message
    assert "outside the adapters directory" in message
