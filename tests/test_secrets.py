"""No secrets at rest: a tracking URI with a user and password in it, as a team server behind
basic auth is often given, never reaches a file, a tag, the Bento or a log line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml
from conftest import BIN, ROOT, cli, project_params

USER, PASSWORD = "alice-secret-user", "s3cret-Pa55word"


def test_credentials_in_the_tracking_uri_are_written_nowhere(trained, tmp_path):
    from mlflow import MlflowClient

    host = trained["uri"].removeprefix("http://")
    home = tmp_path / "bentoml"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://{USER}:{PASSWORD}@{host}",
               BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True")
    name = "pneumoclip-secret-test"
    params = project_params(
        tmp_path, train_clip={"epochs": 1, "patience": 10}, evaluate={"bootstrap": 20},
        register={"variants": ["real"], "model_name": name}, serve={"model_name": name},
    )
    given = yaml.safe_load(Path(trained["params"]).read_text())  # its base and index
    mine = yaml.safe_load(params.read_text())
    for section in ("base_models", "prepare"):
        shutil.copytree(given[section]["out_dir"], mine[section]["out_dir"])
    env["PNEUMOCLIP_PARAMS"] = str(params)  # the service serves this model name
    logs = [cli("train-clip", "--params", str(params), "--variant", "real", env=env),
            cli("evaluate", "--params", str(params), "--variant", "real", env=env),
            cli("register", "--params", str(params), env=env),
            cli("registry", "show", "--params", str(params), env=env),
            cli("bento", "build", "--params", str(params), env=env),
            cli("predict", "--model", f"models:/{name}@champion",
                str(next((ROOT / "sample").rglob("*.jpeg"))), env=env)]
    # a failure message names the store too
    wrong = dict(env, MLFLOW_TRACKING_URI=f"http://{USER}:{PASSWORD}@127.0.0.1:1",
                 MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    logs.append(cli("registry", "show", "--params", str(params), env=wrong, check=False))
    assert logs[-1].returncode != 0
    text = "".join(p.stdout + p.stderr for p in logs)
    assert "registered" in text and host in text  # the logs did talk about the server
    for folder in (tmp_path, home):
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert PASSWORD.encode() not in data and USER.encode() not in data, path
    assert PASSWORD not in text and USER not in text
    client = MlflowClient(trained["uri"])
    registry = json.loads((tmp_path / "artifacts/registry.json").read_text())
    version = client.get_model_version(name, str(registry["version"]))
    run = client.get_run(version.run_id)
    for stored in (version.tags, run.data.tags, run.data.params):
        leaks = {k: v for k, v in stored.items() if USER in v or PASSWORD in v}
        assert not leaks
    bento = subprocess.run([str(BIN / "bentoml"), "models", "get", f"{name}:latest", "-o",
                            "json"], env=env, capture_output=True, text=True, check=True)
    assert host in bento.stdout and PASSWORD not in bento.stdout
