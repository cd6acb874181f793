"""What every command does with a failure: a user's problem is one message and exit 2; a bug is a short note, the
traceback saved to a file (in the run directory when there is one) and exit 1; Ctrl-C is 130. And --threads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tuneforge import cli
from tuneforge.errors import DataError
from tuneforge.models.load import ALLOW_PICKLE_ENV


def failing(exc: BaseException, run_dir: Path | None):
    def command(args):
        args.run_dir = run_dir  # as cmd_train does once it knows the output directory
        raise exc
    return command


def run_with(monkeypatch, capsys, exc: BaseException, run_dir: Path | None = None) -> tuple[int, str]:
    monkeypatch.setattr(cli, "cmd_train", failing(exc, run_dir))  # the parser is built inside main
    code = cli.main(["train"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("exc", "expect"), [
    (DataError("d.jsonl:3: bad"), "error: d.jsonl:3: bad\n"),
    (FileNotFoundError(2, "No such file or directory", "x.jsonl"), "'x.jsonl': No such file or directory"),
    (PermissionError(13, "Permission denied", "/root/runs"), "'/root/runs': Permission denied"),
    (MemoryError(), "out of memory"),
    (RuntimeError("Expected one of cpu, cuda, xpu device type at start of device string: banana"), "train.device"),
    (AssertionError("Torch not compiled with CUDA enabled"), "check train.device"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "is not UTF-8 text"),
    (yaml.YAMLError("bad"), "not valid YAML"),
])
def test_user_problems_are_one_message_and_exit_2(monkeypatch, capsys, exc, expect):
    code, err = run_with(monkeypatch, capsys, exc)
    assert code == 2 and expect in err and "Traceback" not in err and err.count("\n") == 1


def test_a_bug_is_reported_with_the_traceback_in_the_run_directory(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tuneforge-run.json").write_text(json.dumps({"status": "running"}))
    code, err = run_with(monkeypatch, capsys, KeyError("oops"), run_dir=run)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: this is a bug in tuneforge, please report it: KeyError: 'oops'; the traceback is in ")
    saved = Path(err.strip().rsplit(" ", 1)[1])
    assert saved.parent == run and "Traceback" in saved.read_text() and "KeyError: 'oops'" in saved.read_text()


def test_a_bug_outside_a_run_goes_to_the_temp_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    code, err = run_with(monkeypatch, capsys, TypeError("bad operand"), run_dir=tmp_path / "not-a-run")
    saved = Path(err.strip().rsplit(" ", 1)[1])
    assert code == 1 and saved.parent == tmp_path / "tuneforge-crashes" and "TypeError" in saved.read_text()


def test_interrupt_is_130(monkeypatch, capsys):
    assert run_with(monkeypatch, capsys, KeyboardInterrupt())[0] == 130


def test_usage_errors_and_help_return_their_code(capsys):
    assert cli.main(["train", "--bogus"]) == 2
    assert cli.main(["--help"]) == 0


@pytest.mark.parametrize("argv", [
    ["train"], ["eval", "--data", "d.jsonl"], ["advise", "--data", "d.jsonl"],
    ["serve", "--model", "m", "--adapters", "a"], ["lab"], ["generate", "hi"],
    ["chat"], ["demo"], ["data", "inspect", "f.jsonl"],
])
def test_every_command_takes_threads_and_sets_them_before_the_library(monkeypatch, argv):
    seen = []
    monkeypatch.setattr(cli, "use_threads", seen.append)
    parsed = cli.build_parser().parse_args([*argv, "--threads", "3"])
    called = {}
    library = {"train": "tuneforge.train.loop.train", "eval": "tuneforge.eval.run.run_eval",
               "advise": "tuneforge.eval.advise.run_advise", "serve": "tuneforge.serve.serve",
               "lab": "tuneforge.report.lab.run_lab", "generate": "tuneforge.eval.interactive.run_generate",
               "chat": "tuneforge.eval.interactive.chat_loop", "demo": "tuneforge.demo.run_demo",
               "data": "tuneforge.data.inspect.inspect_data"}[argv[0]]

    def stop(*a, **kw):
        called["threads"] = list(seen)
        raise KeyboardInterrupt

    monkeypatch.setattr(library, stop)
    monkeypatch.setattr("tuneforge.eval.interactive.load_prompts", lambda *a: ["hi"])
    monkeypatch.setattr("tuneforge.models.load.load_tokenizer", lambda *a, **kw: None)  # last: nothing imports it now
    with pytest.raises(KeyboardInterrupt):
        parsed.func(parsed)
    assert called["threads"] == [3]


def test_data_paths_with_quotes_and_backslashes_are_set_as_values(tmp_path):
    odd = str(tmp_path / 'we"ird\\na: me.jsonl')
    c = cli.config_of(cli.build_parser().parse_args(["train", "--data", odd, "-o", str(tmp_path / 'o"ut\\')]))
    assert [s.path for s in c.data.train] == [odd] and c.output_dir == str(tmp_path / 'o"ut\\')


def test_allow_pickle_sets_the_environment_for_every_loader(monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    monkeypatch.setattr("tuneforge.adapters.manager.scan_adapters", lambda d: ([], []))
    assert cli.main(["adapters", "list", "somewhere"]) == 0 and ALLOW_PICKLE_ENV not in os.environ
    assert cli.main(["adapters", "list", "--allow-pickle", "somewhere"]) == 0
    assert os.environ[ALLOW_PICKLE_ENV] == "1"


def test_cuda_device_without_cuda_names_the_key(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cli.main(["train", "--set", "train.device=cuda"]) == 2
    assert "train.device: 'cuda' but this machine has no CUDA GPU" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "m", "--adapters", "a", "--device", "cuda"]) == 2
    assert "device: 'cuda' but this machine has no CUDA GPU" in capsys.readouterr().err


def test_serve_refuses_an_empty_api_key_given_on_the_command_line(tmp_path, capsys):
    # before the model loads: "" must not silently mean "no key"
    assert cli.main(["serve", "--model", str(tmp_path / "none"), "--adapters", str(tmp_path), "--api-key", ""]) == 2
    assert "API key" in capsys.readouterr().err
