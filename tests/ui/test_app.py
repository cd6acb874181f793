"""The dashboard without a browser: reading run directories, the HTTP endpoints, the token, the chat relay."""

import json
import os
import shutil
import time
import urllib.error
import urllib.request

import pytest

from tuneforge.ui import runs

pytest.importorskip("starlette", reason="the dashboard needs pip install 'tuneforge[ui]'")
from tuneforge.ui.app import create_app  # noqa: E402

from .conftest import Served  # noqa: E402


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_runs_are_found_with_their_status_and_numbers(runs_root):
    rows = {r["name"]: r for r in (runs.summarize(runs_root, d) for d in runs.find_runs(runs_root))}
    assert set(rows) == {"lr-high", "lr-low"}
    high = rows["lr-high"]
    assert (high["status"], high["method"], high["step"], high["max_steps"]) == ("finished", "lora", 12, 12)
    records, _ = runs.read_records(runs_root / "lr-high" / "metrics.jsonl")
    assert high["best_val_loss"] == min(r["val_loss"] for r in records if "val_loss" in r)


def test_status_comes_from_the_marker_else_from_the_records(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("model: m\n")
    assert runs.run_status(run, [])["status"] == "unknown"
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert runs.run_status(run, [{"step": 1}])["status"] == "running"
    old = time.time() - 3600
    os.utime(run / "metrics.jsonl", (old, old))
    assert runs.run_status(run, [{"step": 1}])["status"] == "stopped"
    final = {"step": 1, "final": True, "stopped_early": "forgetting above 10%"}
    assert runs.run_status(run, [final]) | {} == {"status": "stopped", "started": pytest.approx(time.time(), abs=60),
                                                  "ended": old, "error": "forgetting above 10%"}
    (run / runs.MARKER).write_text(json.dumps({"status": "failed", "started": 1.0, "ended": 2.0, "error": "OOM"}))
    assert runs.run_status(run, [final]) == {"status": "failed", "started": 1.0, "ended": 2.0, "error": "OOM"}


def test_a_line_being_written_waits_for_its_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    records, offset = runs.read_records(path)
    assert [r["step"] for r in records] == [1, 2]
    with path.open("a") as f:
        f.write('p": 3}\n')
    assert runs.read_records(path, offset) == ([{"step": 3}], path.stat().st_size)


def test_config_diff_lists_only_the_keys_that_differ(runs_root):
    diff = runs.config_diff([runs.read_config(runs_root / n) for n in ("lr-high", "lr-low")])
    keys = {row["key"]: row["values"] for row in diff}
    assert keys["train.lr"] == [0.01, 0.001] and keys["method.lora.r"] == [16, 4]
    assert "train.max_steps" not in keys


def test_endpoints_serve_runs_files_and_refuse_paths_outside_a_run(runs_root):
    with Served(create_app(runs_root)) as s:
        status, body = get(f"{s.url}/api/run?run=lr-high")
        detail = json.loads(body)
        assert status == 200 and "plots/loss.png" in detail["plots"] and detail["evals"][0]["name"] == "eval"
        assert detail["reports"] == ["report.md"]
        assert get(f"{s.url}/api/file?run=lr-high&path=plots/loss.png")[1][:4] == b"\x89PNG"
        html = json.loads(get(f"{s.url}/api/file?run=lr-high&path=report.md")[1])["html"]
        assert "<strong>loss</strong>" in html and "<b>" not in html  # raw HTML in a report is escaped
        assert get(f"{s.url}/api/file?run=lr-high&path=../lr-low/config.yaml")[0] == 404
        assert get(f"{s.url}/api/run?run=../..")[0] == 404
        events = get(f"{s.url}/api/stream?run=lr-low")[1].decode()  # a finished run: everything, then "end"
        first = json.loads(events.split("\n")[0].removeprefix("data: "))
        assert first["reset"] and first["records"][-1]["final"] and "event: end" in events


def test_every_endpoint_needs_the_token_when_one_is_set(runs_root):
    with Served(create_app(runs_root, token="s3cret")) as s:
        for path in ("/", "/api/runs", "/static/app.js", "/api/stream?run=lr-low"):
            assert get(s.url + path)[0] == 401, path
        assert get(f"{s.url}/api/runs", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(f"{s.url}/api/runs", {"Authorization": "Bearer s3cret"})[0] == 200
        with urllib.request.urlopen(f"{s.url}/?token=s3cret") as r:  # the printed URL sets a cookie
            cookie = r.headers["Set-Cookie"].split(";")[0]
        assert get(f"{s.url}/api/runs", {"Cookie": cookie})[0] == 200


def test_chat_relay_streams_a_served_answer_and_explains_an_absent_server(runs_root, model_dir, tmp_path):
    from tuneforge.serve import ServeOptions, Server

    adapters = tmp_path / "adapters"
    shutil.copytree(runs_root / "lr-high" / "adapter", adapters / "lr-high")
    with Served(create_app(runs_root)) as ui, Server(ServeOptions(model=str(model_dir), adapters=str(adapters),
                                                                  port=0, scan_interval_s=0)).start() as serve:
        models = json.loads(get(f"{ui.url}/api/chat/models?url={serve.url}")[1])
        ids = [m["id"] for m in models["data"]]
        assert ids[1:] == ["lr-high"]
        body = json.dumps({"url": serve.url, "model": ids[0], "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": "Upper-case the word: apple"}]}).encode()
        req = urllib.request.Request(f"{ui.url}/api/chat", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            lines = [x.decode().strip() for x in r if x.startswith(b"data: ")]
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert lines[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert len(chunks) > 2  # a role chunk, token chunks, a finish chunk: relayed as the server sent them
        status, body = get(f"{ui.url}/api/chat/models?url=http://127.0.0.1:9")
        assert status == 502 and "tuneforge serve" in json.loads(body)["error"]
