"""The spec's `tracking:` section, and what the sandbox lets its MLflow tracking URI reach."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.sandbox import Rules
from orchestrator.settings import Settings
from orchestrator.spec import SpecError, build_spec

BASE = {"name": "t", "objective": "clm", "model": "/models/m",
        "dataset": {"train_files": ["/data/a.jsonl"]}}


def spec_with(tracking: object, base_dir: Path | None = None):  # type: ignore[no-untyped-def]
    return build_spec({**BASE, "tracking": tracking}, base_dir=base_dir)


def test_the_section_is_optional_and_switches_read_plainly(tmp_path: Path) -> None:
    assert build_spec(BASE).tracking is None
    assert "tracking" in build_spec(BASE).to_dict()  # stored as null: what ran
    on = spec_with({"tensorboard": True, "mlflow": True})
    assert on.tracking.tensorboard and on.tracking.mlflow.tracking_uri is None
    assert on.tracking.mlflow.log_model is True
    assert spec_with({"mlflow": False}).tracking.mlflow is None
    # A directory is relative to the spec file, like checkpoints.storage; URLs stay as given.
    rel = spec_with({"mlflow": {"tracking_uri": "runs", "experiment": "e"}}, base_dir=tmp_path)
    assert rel.tracking.mlflow.tracking_uri == str(tmp_path / "runs")
    url = spec_with({"mlflow": {"tracking_uri": "http://mlflow:5000"}}, base_dir=tmp_path)
    assert url.tracking.mlflow.tracking_uri == "http://mlflow:5000"


@pytest.mark.parametrize(("tracking", "message"), [
    ({"tensorbord": True}, "tracking.tensorbord: unknown key in tracking"),
    ({"tensorboard": "yes"}, "tracking.tensorboard"),
    ({"mlflow": {"uri": "x"}}, "tracking.mlflow.uri: unknown key in tracking.mlflow"),
    ({"mlflow": {"experiment": ""}}, "tracking.mlflow.experiment"),
])
def test_mistakes_name_the_field(tracking: object, message: str) -> None:
    with pytest.raises(SpecError) as raised:
        spec_with(tracking)
    assert message in str(raised.value)


def rules(tmp_path: Path, **settings: object) -> Rules:
    return Rules.from_settings(Settings(home=tmp_path, auth="users", data_roots="/",
                                        storage_roots=str(tmp_path / "jobs"), **settings))


def test_a_tracking_uri_is_confined_like_checkpoint_storage(tmp_path: Path) -> None:
    team = rules(tmp_path)
    inside = str(tmp_path / "jobs" / "mlruns")

    def problems(uri: str, r: Rules = team) -> list[str]:
        return r.problems(spec_with({"mlflow": {"tracking_uri": uri}}))

    assert problems(inside) == [] and problems(f"file://{inside}") == []
    assert problems(f"sqlite:///{inside}/mlflow.db") == []
    for outside in ("/etc/mlruns", "sqlite:////etc/mlflow.db", f"{tmp_path}/jobs/../x"):
        [problem] = problems(outside)
        assert problem.startswith("tracking.mlflow.tracking_uri: ") and "ORCH_STORAGE_ROOTS" in problem
    # A server the spec names is refused unless the operator allows it ...
    [problem] = problems("http://10.0.0.1:5000")
    assert "http:// URLs are not allowed here" in problem and "leave tracking_uri out" in problem
    # ... by naming it as the default, or by scheme and prefix, as for storage URLs.
    default = rules(tmp_path, mlflow_tracking_uri="http://mlflow.internal:5000")
    assert problems("http://mlflow.internal:5000/", default) == []
    assert problems("http://elsewhere:5000", default) != []
    allowed = Rules.from_settings(Settings(
        home=tmp_path, auth="users", allowed_url_schemes="s3,https", data_roots="/",
        storage_roots=f"{tmp_path}/jobs,https://mlflow.team.internal"))
    assert problems("https://mlflow.team.internal/", allowed) == []
    assert problems("https://user:pw@mlflow.team.internal", allowed) != []
    # No tracking URI: the server's default or the job's own directory, nothing to check.
    assert team.problems(spec_with({"mlflow": True})) == []


def test_the_workers_get_the_servers_default(tmp_path: Path) -> None:
    env = rules(tmp_path, mlflow_tracking_uri="http://mlflow:5000").worker_env()
    assert env["ORCH_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "ORCH_MLFLOW_TRACKING_URI" not in rules(tmp_path).worker_env()
