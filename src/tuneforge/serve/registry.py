"""The adapters directory as the server's model registry: hot add, change and removal, without a restart.

Every subfolder holding a PEFT adapter is served under the folder's name. A rescan is a handful of
``stat`` calls (no file is read unless something changed), so it runs on GET /v1/models, on every
request for an unknown or changed model, and every few seconds in the background.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from tuneforge.adapters.manager import AdapterSet
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.methods.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tuneforge.serve.protocol import APIError

log = logging.getLogger("tuneforge.serve")

Fingerprint = tuple[tuple[str, int, int, int], ...]


def check_name(name: str) -> str:
    """An adapter name is one plain folder name: no separators, no '..', no hidden names."""
    seps = {"/", "\\", "\0"} | ({os.sep, os.altsep} - {None})
    if not name or len(name) > 255 or name.startswith(".") or any(s in name for s in seps):
        raise APIError(400, f"invalid model name {name!r}: an adapter name is a folder name inside the adapters "
                            "directory (no path separators, no '..', not hidden)", param="model")
    return name


def is_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or somewhere below it."""
    return path.resolve().is_relative_to(root.resolve())


def fingerprint(adapter_dir: Path) -> Fingerprint:
    """Sizes, mtimes and inodes of the adapter's two files: changes when either is rewritten or replaced."""
    out = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            st = (adapter_dir / name).stat()
        except OSError:
            continue
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def list_adapter_dirs(root: Path) -> dict[str, Path]:
    """{name: folder} of the candidate adapters: ``root`` itself when it is one, else its subfolders."""
    if (root / CONFIG_NAME).is_file():
        return {root.name: root}
    try:
        entries = sorted(root.iterdir())
    except OSError:  # the directory went away: nothing to serve
        return {}
    return {p.name: p for p in entries if not p.name.startswith(".") and p.is_dir()
            and ((p / CONFIG_NAME).exists() or (p / WEIGHTS_NAME).exists())}


class AdapterRegistry:
    """Keeps the AdapterSet's adapters equal to the adapters directory's content."""

    def __init__(self, adapter_set: AdapterSet, root: str | os.PathLike, base_id: str) -> None:
        self.adapter_set, self.root, self.base_id = adapter_set, Path(root), base_id
        if not self.root.is_dir():
            raise ConfigError(f"adapters directory {self.root} does not exist; create it (it may be empty) "
                              "or pass --adapters DIR")
        self.errors: dict[str, str] = {}  # adapters that could not be loaded, and why
        self._loaded: dict[str, tuple[Path, Fingerprint]] = {}
        self._failed: dict[str, Fingerprint] = {}  # not retried until their files change
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    def model_ids(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def sync(self) -> None:
        """Load new or changed adapters, unload removed ones."""
        with self._lock:
            found = list_adapter_dirs(self.root)
            prints = {name: fingerprint(path) for name, path in found.items()}
            for name in [n for n, (_, fp) in self._loaded.items() if prints.get(n) != fp]:
                self.adapter_set.unload(name)  # removed, or changed (reloaded below)
                del self._loaded[name]
                log.info("adapter %s unloaded", name)
            for name in [n for n in self._failed if prints.get(n) != self._failed[n]]:
                del self._failed[name]
                self.errors.pop(name, None)
            for name, path in found.items():
                if name not in self._loaded and name not in self._failed:
                    self._load(name, path, prints[name])

    def _load(self, name: str, path: Path, fp: Fingerprint) -> None:
        try:
            if name == self.base_id:
                raise ConfigError(f"the adapter folder {name!r} has the base model's name; rename it")
            check_name(name)
            if not is_inside(self.root, path):
                raise ConfigError(f"{path} resolves outside the adapters directory {self.root}; "
                                  "copy the adapter in instead of linking to it")
            self.adapter_set.load(name, path)
        except (TuneforgeError, APIError, OSError) as e:
            self._failed[name], self.errors[name] = fp, str(e)
            log.warning("adapter %s not loaded: %s", name, e)
            return
        self._loaded[name] = (path, fp)
        log.info("adapter %s loaded from %s", name, path)

    def lookup(self, model: str) -> str | None:
        """The adapter to run for ``model`` (None: the base); 400 for a bad name, 404 for an unknown one."""
        if model == self.base_id:
            return None
        check_name(model)  # a plain name: _load checks where each served folder resolves
        with self._lock:
            path, fp = self._loaded.get(model, (None, None))
            fresh = path is not None and fingerprint(path) == fp
        if not fresh:  # unknown, removed or changed on disk: look again before answering
            self.sync()
        with self._lock:
            if model in self._loaded:
                return model
            reason = f" (it could not be loaded: {self.errors[model]})" if model in self.errors else ""
        raise APIError(404, f"the model {model!r} does not exist{reason}; available models: "
                            f"{', '.join(self.model_ids())}", param="model", code="model_not_found")

    def start(self, interval_s: float) -> AdapterRegistry:
        """Rescan every ``interval_s`` seconds in a background thread (removed adapters free memory)."""
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.sync()
                except Exception:  # a bad scan must not stop the next one
                    log.exception("adapter rescan failed")

        if interval_s > 0:
            self._thread = threading.Thread(target=loop, name="tuneforge-adapter-scan", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
