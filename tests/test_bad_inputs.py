"""The bad-input corpus (tests/bad_inputs/cases.yaml): every case ends in one message and exit 2, never a traceback.

Data files run through ``train`` (strict: stopped at the first bad record, named file:line) and ``data inspect``
(bad records skipped and counted exactly). A tiny model folder stands in for a real model; every case fails
before a model's weights would be loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model, build_tiny_tokenizer
from tuneforge import cli

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))


def case_id(case: dict) -> str:
    return case.get("copy_as") or case.get("data") or " ".join(case["argv"]).replace("{dir}/", "")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fill(text: str, tmp_path: Path, model_dir: Path) -> str:
    return text.replace("{dir}", str(CORPUS)).replace("{tmp}", str(tmp_path)).replace("{model}", str(model_dir))


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60 and len({case_id(c) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_is_one_message_and_exit_2(case, tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs of commands that get further than expected stay here
    expect = fill(case["expect"], tmp_path, model_dir)
    if "argv" in case:
        code, _, err = run([fill(a, tmp_path, model_dir) for a in case["argv"]], capsys)
        assert (code, "Traceback" in err) == (2, False), err
        assert expect in err, err
        return
    path = CORPUS / "data" / case["data"]
    if "copy_as" in case:
        path = shutil.copy(path, tmp_path / case["copy_as"])
        expect = expect.replace(case["copy_as"], str(path))
    seq = str(case.get("max_seq_len", 64))
    code, _, err = run(["train", "--data", str(path), "--model", str(model_dir), "-o", str(tmp_path / "run"),
                        "--set", f"data.max_seq_len={seq}", "--max-steps", "1", "--threads", "1"], capsys)
    assert (code, "Traceback" in err) == (2, False), err
    assert expect in err, err
    code, out, err = run(["data", "inspect", str(path), "--model", str(model_dir), "--max-seq-len", seq,
                          "--out", str(tmp_path / "inspect"), "--threads", "1"], capsys)
    assert "Traceback" not in err, err
    if case["skipped"] is None:
        assert code == 2 and expect.split(": ", 1)[0].split(":")[0] in err, err
    else:
        assert code == 0, err
        assert f"skipped {case['skipped']}:" in out and expect.split(": ", 1)[0] in out, out
