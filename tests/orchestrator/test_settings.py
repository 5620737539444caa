"""Settings: every ORCH_* variable in one object, errors that name the variable, and the
README's table generated from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.errors import SettingsError
from orchestrator.settings import Settings, get_settings, settings_table
from orchestrator.store import Store

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("ORCH_HOME", str(home))
    monkeypatch.delenv("ORCH_DATABASE_URL", raising=False)
    assert get_settings().home_dir() == home and home.is_dir()
    assert get_settings().database() == f"sqlite:///{home}/orch.db"
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql+psycopg://u@h/db")
    assert get_settings().database() == "postgresql+psycopg://u@h/db"
    assert get_settings() is get_settings()  # parsed once, not per call


def test_default_url_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ORCH_DATABASE_URL", raising=False)
    with Store() as store:
        assert store.url == f"sqlite:///{tmp_path}/home/orch.db"
        job = store.create_job(name="n", objective="clm", owner="o", spec={}, spec_yaml="",
                               gpus=0, cpus=1)
        assert job.artifact_dir == str(tmp_path / "home" / "jobs" / str(job.id))
    assert (tmp_path / "home" / "orch.db").is_file()


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("ORCH_SERVER_PORT", "http", "ORCH_SERVER_PORT='http'"),
    ("ORCH_SERVER_PORT", "70000", "less than or equal to 65535"),
    ("ORCH_EXECUTOR", "docker", "ORCH_EXECUTOR='docker'"),
    ("ORCH_RAY_CLIENT_PORT", "10005", "inside Ray's worker port range 10002-19999"),
    ("ORCH_SCHEDULER_INTERVAL", "0", "ORCH_SCHEDULER_INTERVAL"),
])
def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                     variable: str, value: str,
                                                     words: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        get_settings()
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_every_orch_variable_the_code_reads_is_a_setting() -> None:
    """No module reads an ORCH_* variable on its own: they are all fields of Settings (the
    tests' own variables, ORCH_TEST_*, aside)."""
    known = {f"ORCH_{name.upper()}" for name in Settings.model_fields}
    found: dict[str, set[str]] = {}
    for path in [*REPO.glob("orchestrator/**/*.py"), *REPO.glob("workers/**/*.py")]:
        for name in re.findall(r"\bORCH_[A-Z_]+[A-Z]\b", path.read_text()):
            found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert {n: f for n, f in found.items() if n not in known} == {}
    reads = [str(p.relative_to(REPO)) for p in [*REPO.glob("orchestrator/**/*.py"),
                                                 *REPO.glob("workers/**/*.py")]
             if re.search(r"environ(\.get)?[\[(]\s*[\"']ORCH_", p.read_text())]
    assert reads == []


def test_readme_table_is_generated_from_the_settings() -> None:
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- settings table: python -m orchestrator.settings -->", "<!-- end -->"
    assert start in readme, "README.md must hold the generated settings table"
    table = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == settings_table().strip()
