"""A credential in a URI (tracking server, object storage) is never printed, logged or stored."""

from __future__ import annotations

import pytest

from pipeline.core.command import UserError, command
from pipeline.core.config import load_config
from pipeline.core.redaction import redact


@pytest.mark.parametrize("text, expected", [
    ("http://alice:s3cret@mlflow.internal:5000/#/runs", "http://***@mlflow.internal:5000/#/runs"),
    ("s3://AKIAKEY:SECRETKEY@bucket/runs", "s3://***@bucket/runs"),
    ("https://token@host/a and gs://u:p@b/c", "https://***@host/a and gs://***@b/c"),
    ("http://mlflow:5000", "http://mlflow:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("mail alice@example.com", "mail alice@example.com"),
])
def test_credentials_in_urls_are_replaced(text, expected):
    assert redact(text) == expected


def test_the_config_as_logged_and_stored_carries_no_credential():
    cfg = load_config("smoke", ["tracking.uri=http://alice:s3cret@mlflow.internal:5000",
                                "data.input=[s3://KEY:SECRET@bucket/corpus.jsonl]"])
    assert cfg.tracking.uri == "http://alice:s3cret@mlflow.internal:5000"  # the code still connects with it
    flat = cfg.flat()  # the MLflow params
    assert flat["tracking.uri"] == "http://***@mlflow.internal:5000" and flat["data.input"] == ["s3://***@bucket/corpus.jsonl"]
    assert "s3cret" not in cfg.to_yaml() and "SECRET" not in cfg.to_yaml()


def test_an_error_naming_a_url_prints_it_redacted(capsys):
    @command
    def main(argv):
        raise UserError("cannot reach http://alice:s3cret@127.0.0.1:9/api")

    assert main([]) == 2
    assert capsys.readouterr().err.strip() == "error: cannot reach http://***@127.0.0.1:9/api"


def test_an_unreachable_tracking_server_is_reported_without_its_password(monkeypatch, tmp_path):
    from pipeline.core.lineage import Lineage

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    lines: list[str] = []
    track = Lineage("http://alice:s3cret@127.0.0.1:9", "gpt2-pretraining", str(tmp_path), attempts=1, log=lines.append)
    assert not track.available and lines
    assert all("s3cret" not in line for line in lines) and any("http://***@127.0.0.1:9" in line for line in lines)
