"""Label Studio for the engine's tests: its own virtualenv (`make labelstudio`, which `make test` runs)
holds the server and label-studio-sdk, the oracle for our brush-RLE codec."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from sam_train.engine.labelstudio import LabelStudio
from sam_train.engine.mlbackend import Backend, make_server
from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_STUDIO_VENV = REPO_ROOT / os.environ.get("SAM_TRAIN_LABEL_STUDIO_VENV", ".venv-labelstudio")
TEST_USER, TEST_PASSWORD, TEST_TOKEN = "engine-test@example.com", "engine-test-password", "sam-train-test-token"
START_TIMEOUT_S = 300  # first start migrates a fresh database: 30-40 s on an idle 2-core machine, more when busy


def label_studio_executable(name: str) -> Path:
    """A program of Label Studio's virtualenv; if absent, fails under `make test` or CI and skips in a bare `pytest` run."""
    path = LABEL_STUDIO_VENV / "bin" / name
    if not path.is_file():
        reason = f"Label Studio's virtualenv {LABEL_STUDIO_VENV} is missing ({path}): run `make labelstudio`"
        if os.environ.get("SAM_TRAIN_LABEL_STUDIO_VENV") or os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def run_in_label_studio_venv() -> Callable[[str, object], object]:
    """Run a Python script in Label Studio's virtualenv with JSON on stdin and get its JSON stdout back."""
    python = label_studio_executable("python")

    def run(script: str, payload: object) -> object:
        done = subprocess.run([python, "-c", script], input=json.dumps(payload), capture_output=True, text=True,
                              timeout=600, check=False)
        if done.returncode:
            raise RuntimeError(f"script in {LABEL_STUDIO_VENV} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout)

    return run


@dataclass(frozen=True)
class LabelStudioServer:
    """A running test server: where it is, who the test user is, and where it serves local images from."""

    url: str
    user: str
    token: str
    files_root: Path  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: images under it can be served to tasks
    start_seconds: float

    def client(self) -> LabelStudio:
        """An API client authenticated as the test user."""
        return LabelStudio(self.url, self.token)


@contextmanager
def serving_backend(backend: Backend, port: int = 0) -> Iterator[str]:
    """Serve `backend` on 127.0.0.1 from a thread (port 0: any free one); yields its URL, stops it on exit."""
    server = make_server(backend, "127.0.0.1", port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A Label Studio server on 127.0.0.1 for the whole session: a known user and token, no network calls."""
    executable = label_studio_executable("label-studio")
    root = tmp_path_factory.mktemp("label_studio")
    data_dir, files_root, log_path = root / "data", root / "files", root / "server.log"
    files_root.mkdir()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": TEST_USER,
        "LABEL_STUDIO_PASSWORD": TEST_PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": TEST_TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # Token auth is off by default for a new organisation
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
        # Our ML backend listens on 127.0.0.1: Label Studio refuses ML backends and webhooks on loopback otherwise.
        "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
    }
    command = [str(executable), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(free_port()),
               "--data-dir", str(data_dir)]
    started = time.monotonic()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = _wait_until_up(server, log_path, started)
        yield LabelStudioServer(url, TEST_USER, TEST_TOKEN, files_root, time.monotonic() - started)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # its own session: only what this fixture started
            server.wait()


def _wait_until_up(server: subprocess.Popen, log_path: Path, started: float) -> str:
    """The server's URL once /health answers; fails with the log's tail if it exits or times out."""
    url = None
    while time.monotonic() - started < START_TIMEOUT_S:
        log = log_path.read_text(errors="replace")
        if server.poll() is not None:
            raise RuntimeError(f"label-studio exited with {server.returncode}:\n{log[-3000:]}")
        # A busy port silently moves to the next one: take the address the server reports.
        if url is None:
            found = re.search(r"Starting development server at (http://127\.0\.0\.1:\d+)/", log)
            url = found.group(1) if found else None
        if url is not None and LabelStudio(url, TEST_TOKEN, timeout=5).health():
            return url
        time.sleep(0.5)
    raise RuntimeError(f"label-studio is not up after {START_TIMEOUT_S} s:\n{log[-3000:]}")
