"""The adapters directory as the server's model registry: hot add, change and removal, without a restart.

Every subfolder holding a PEFT adapter is served under the folder's name, and every run directory
holding one (``runs/NAME/adapter``) under the run's name. Each adapter is loaded on its own: one that
cannot be loaded, for whatever reason, is listed as failed with the reason and retried only when its
files change; the others keep serving. A changed folder is loaded as a new
version beside the old one and swapped in; requests that already hold the old version finish on
it, and the old version is freed when the last of them ends. A rescan is a handful of ``stat``
calls (no file is read unless something changed), so it runs on GET /v1/models, on every request
for an unknown or changed model, and every few seconds in the background.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tuneforge.adapters.manager import AdapterSet, adapter_in, find_adapter_dirs
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.log import get_logger
from tuneforge.methods.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tuneforge.serve.protocol import APIError

logger = get_logger(__name__)

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


@dataclass
class Version:
    """One load of an adapter folder; ``key`` is its name inside the AdapterSet."""

    name: str
    key: str
    path: Path
    fp: Fingerprint
    users: int = 0  # requests holding this version
    retired: bool = False  # replaced or removed: freed when ``users`` drops to 0


class AdapterRegistry:
    """Keeps the AdapterSet's adapters equal to the adapters directory's content."""

    def __init__(self, adapter_set: AdapterSet, root: str | os.PathLike, base_id: str) -> None:
        self.adapter_set, self.root, self.base_id = adapter_set, Path(root), base_id
        if not self.root.is_dir():
            raise ConfigError(f"adapters directory {self.root} does not exist; create it (it may be empty) "
                              "or pass --adapters DIR")
        self._served: dict[str, Version] = {}
        self._failed: dict[str, tuple[Fingerprint, str]] = {}  # not retried until their files change
        self._retired: list[Version] = []  # replaced or removed, still used by a request
        self._versions = itertools.count(1)
        self._lock = threading.Lock()  # guards the maps above; never held while the model is touched
        self._sync_lock = threading.Lock()  # one rescan at a time
        self._scan_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return sorted(self._served)

    @property
    def errors(self) -> dict[str, str]:
        """{name: why it is not served} for the folders that could not be loaded (paths inside the folder)."""
        with self._lock:
            return {name: self.public(reason) for name, (_, reason) in sorted(self._failed.items())}

    def model_ids(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def in_use(self, name: str) -> int:
        """How many requests hold some version of adapter ``name``."""
        with self._lock:
            return sum(v.users for v in [*self._served.values(), *self._retired] if v.name == name)

    def public(self, message: str) -> str:
        """``message`` with the adapters folder's location removed: clients see paths inside it only."""
        base = self.root.parent if adapter_in(self.root) is not None else self.root
        for prefix in sorted({str(base.resolve()), str(base.absolute()), str(base)}, key=len, reverse=True):
            message = message.replace(prefix + os.sep, "").replace(prefix, "the adapters directory")
        return message

    def sync(self) -> None:
        """Load new or changed adapters, retire removed ones; never raises (a failed scan is logged once)."""
        with self._sync_lock:
            try:
                found = find_adapter_dirs(self.root)
                prints = {name: fingerprint(path) for name, path in found.items()}
            except Exception as e:  # noqa: BLE001 (the server must outlive whatever the file system does)
                if str(e) != self._scan_error:
                    logger.warning(f"cannot scan the adapters directory {self.root}: {e}")
                self._scan_error = str(e)
                return
            self._scan_error = None
            with self._lock:
                for version in [v for n, v in self._served.items() if prints.get(n) != v.fp]:
                    del self._served[version.name]
                    self._retire(version)
                    if version.name not in found:
                        logger.info(f"adapter {version.name} removed")
                for name in [n for n, (fp, _) in self._failed.items() if prints.get(n) != fp]:
                    del self._failed[name]
                todo = [n for n in found if n not in self._served and n not in self._failed]
            self._free_idle()
            for name in todo:
                self._load(name, found[name], prints[name])

    def _load(self, name: str, path: Path, fp: Fingerprint) -> None:
        key = f"{name}/{next(self._versions)}"  # '/' cannot be in a folder name: no clash with a served name
        try:
            if name == self.base_id:
                raise ConfigError(f"the adapter folder {name!r} has the base model's name; rename it")
            check_name(name)
            if not is_inside(self.root, path):
                raise ConfigError(f"{path} links to a folder outside the adapters directory; "
                                  "copy the adapter in instead of linking to it")
            self.adapter_set.load(key, path)
        except (TuneforgeError, APIError, OSError) as e:
            self._fail(name, fp, str(e))
            return
        except Exception as e:  # noqa: BLE001 (one malformed folder must not stop the others)
            self._fail(name, fp, f"{path}: malformed adapter_config.json or weights ({type(e).__name__}: {e})")
            return
        with self._lock:
            self._served[name] = Version(name, key, path, fp)
        logger.info(f"adapter {name} loaded from {path}")

    def _fail(self, name: str, fp: Fingerprint, reason: str) -> None:
        with self._lock:
            self._failed[name] = (fp, reason)
        logger.warning(f"adapter {name} not served: {reason}")  # once: the folder is retried when it changes

    def _retire(self, version: Version) -> None:
        version.retired = True
        self._retired.append(version)

    def _free_idle(self) -> None:
        """Unload retired versions that no request holds (waits for a running batch to end)."""
        with self._lock:
            idle = [v for v in self._retired if v.users == 0]
            self._retired = [v for v in self._retired if v.users > 0]
        for version in idle:
            self.adapter_set.unload(version.key)

    def lookup(self, model: str) -> str | None:
        """The served adapter named ``model`` (None: the base); 400 for a bad name, 404 for an unknown one."""
        version = self._acquire(model, hold=False)
        return None if version is None else version.name

    @contextmanager
    def lease(self, model: str) -> Iterator[str | None]:
        """The AdapterSet name to run for ``model`` (None: the base), kept loaded until the block ends."""
        version = self._acquire(model, hold=True)
        try:
            yield None if version is None else version.key
        finally:
            if version is not None:
                with self._lock:
                    version.users -= 1
                self._free_idle()

    def _acquire(self, model: str, hold: bool) -> Version | None:
        if model == self.base_id:
            return None
        check_name(model)  # a plain name: _load checks where each served folder resolves
        for rescanned in (False, True):
            with self._lock:
                version = self._served.get(model)
                # unknown, removed or changed on disk: look again before answering
                if version is not None and (rescanned or fingerprint(version.path) == version.fp):
                    version.users += hold
                    return version
                if rescanned:
                    failed = self._failed.get(model)
                    served = [self.base_id, *sorted(self._served)]
                    break
            self.sync()
        reason = f" (it could not be loaded: {self.public(failed[1])})" if failed else ""
        raise APIError(404, f"the model {model!r} does not exist{reason}; available models: {', '.join(served)}",
                       param="model", code="model_not_found")

    def start(self, interval_s: float) -> AdapterRegistry:
        """Rescan every ``interval_s`` seconds in a background thread (removed adapters free memory)."""
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.sync()

        if interval_s > 0:
            self._thread = threading.Thread(target=loop, name="tuneforge-adapter-scan", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
