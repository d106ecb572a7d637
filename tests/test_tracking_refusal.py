"""A tracking server that answers and refuses us (401, 403, a Host name it does not allow) stops the pipeline
at its start with one line and exit code 2; one that cannot be reached does not (README: an unreachable
server never stops training); a register stage asked to register that registers nothing fails."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest
from conftest import REPO

from pipeline.core.lineage import TrackingRefused, check_server

INVALID_HOST = "Invalid Host header - possible DNS rebinding attack detected"  # MLflow 3.17's answer


class Refusing(http.server.BaseHTTPRequestHandler):
    status, body = 403, INVALID_HOST

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.requests.append((self.path, dict(self.headers)))
        payload = self.body.encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_server():
    servers = []

    def start(status: int, body: str) -> tuple[str, http.server.HTTPServer]:
        handler = type("Handler", (Refusing,), {"status": status, "body": body})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.requests = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("status, body, expected", [
    (403, INVALID_HOST, "does not allow the Host name"),
    (401, "You are not authenticated. Please see the documentation.", "set MLFLOW_TRACKING_USERNAME"),
    (403, "Permission denied", "HTTP 403 with no login"),
])
def test_a_server_that_refuses_us_is_a_user_error_naming_it(refusing_server, monkeypatch, status, body, expected):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    uri, _ = refusing_server(status, body)
    with pytest.raises(TrackingRefused) as err:
        check_server(uri)
    assert uri in str(err.value) and f"HTTP {status}" in str(err.value) and expected in str(err.value)


def test_the_check_sends_mlflows_client_credentials_and_never_prints_the_password(refusing_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-s3cret")
    uri, server = refusing_server(401, "Incorrect username or password")
    with pytest.raises(TrackingRefused) as err:
        check_server(uri)
    assert "user 'pipeline'" in str(err.value) and "wrong-s3cret" not in str(err.value)
    (_, headers), = server.requests
    assert headers["Authorization"].startswith("Basic ")


def test_an_unreachable_server_and_a_local_store_are_not_refusals():
    check_server("http://127.0.0.1:9")  # connection refused: Lineage warns, training goes on
    check_server("sqlite:////nonexistent/mlflow.db")


def test_the_pipeline_exits_2_with_one_line_naming_a_server_that_answers_403(refusing_server, tmp_path):
    uri, _ = refusing_server(403, INVALID_HOST)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), f"run.root={tmp_path / 'runs'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and uri in errors[0] and "HTTP 403" in errors[0]
    assert not (tmp_path / "runs" / "smoke" / "data").exists()  # refused before any work


def test_the_register_stage_asked_to_register_fails_when_nothing_was_registered():
    from pipeline import register
    from pipeline.core.config import load_config
    from pipeline.core.stage import StageError

    on = load_config("smoke", []).with_absolute_paths()
    with pytest.raises(StageError, match="nothing was registered"):
        register._run(on, False, None, lambda name: None)
    off = load_config("smoke", ["tracking.enabled=false"]).with_absolute_paths()
    assert register._run(off, False, None, lambda name: None).output is None  # not asked: nothing to do
