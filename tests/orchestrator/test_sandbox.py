"""The sandbox rules: a spec reaches only what the operator allows, a refusal never depends
on whether a file exists and never quotes one, job directories are made once, privately,
and the server's files are its own."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from orchestrator.cluster import Capacity
from orchestrator.errors import Conflict, SettingsError
from orchestrator.preflight import check_dataset, preflight
from orchestrator.sandbox import Rules, check_roots_exist, make_job_dir, new_job_dirs, private_dir
from orchestrator.server import ControlPlane, create_app
from orchestrator.settings import Settings, get_settings
from orchestrator.spec import build_spec
from orchestrator.store import Store
from tests.support import REPO, FakeExecutor, as_local_user

ASSETS = REPO / "jobs" / "assets"
MODEL = str(ASSETS / "models" / "bert-tiny")
TRAIN = str(ASSETS / "data" / "lm" / "train.jsonl")
SECRET = "hunter2-do-not-print"


def rules(data: list[str], storage: list[str] | None = None, **kw: object) -> Rules:
    return Rules(data_roots=tuple(data), storage_roots=tuple(storage or data),
                 url_schemes=tuple(kw.get("schemes", ("s3", "gs", "az"))),  # type: ignore[arg-type]
                 allow_hub=bool(kw.get("hub", True)))


def spec(**changes: object):  # type: ignore[no-untyped-def]
    data: dict = {"name": "s", "objective": "mlm", "model": MODEL,
                  "dataset": {"train_files": [TRAIN], "eval_fraction": 0.1},
                  "training": {"max_steps": 2}}
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return build_spec(data)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside every root the tests allow, holding a secret CSV."""
    where = tmp_path / "outside"
    where.mkdir()
    (where / "secret.csv").write_text(f"password,{SECRET}\n1,2\n")
    return where


# -- the rules ------------------------------------------------------------------------------
def test_local_mode_is_open_and_users_mode_is_closed_by_default(tmp_path: Path) -> None:
    local = Rules.from_settings(Settings(home=tmp_path, auth="local"))
    assert local.data_roots == ("/", "s3://", "gs://", "az://") == local.storage_roots
    team = Rules.from_settings(Settings(home=tmp_path, auth="users"))
    assert team.data_roots == (str(tmp_path / "data"), str(tmp_path / "jobs"))
    assert team.storage_roots == (str(tmp_path / "jobs"),)
    assert team.url_schemes == ("s3", "gs", "az") and team.allow_hub
    explicit = Rules.from_settings(Settings(home=tmp_path, auth="users", data_roots="/srv/d",
                                            storage_roots="/srv/o,s3://team/orch"))
    assert explicit.data_roots == ("/srv/d",)
    assert explicit.storage_roots == ("/srv/o", "s3://team/orch")


def test_the_workers_get_exactly_the_servers_rules(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    server = Rules.from_settings(Settings(home=tmp_path, auth="users", allow_hub=False,
                                          allowed_url_schemes="s3"))
    for name, value in server.worker_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "elsewhere"))  # the worker's own home
    assert Rules.from_settings(get_settings()) == server


@pytest.mark.parametrize("value", ["{o}/secret.csv", "{o}/missing.csv", "{r}/../outside/secret.csv",
                                   "{r}/link/secret.csv", "{r}/link/missing.csv"])
def test_outside_the_roots_is_refused_alike_whether_or_not_it_exists(
        tmp_path: Path, outside: Path, value: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "link").symlink_to(outside)  # a link inside the root pointing out of it
    path = value.format(o=outside, r=root)
    allowed = rules([str(root)])
    problem = allowed.check_source("dataset.train_files", path, hub=False)
    # The same words for a present and a missing file: nothing to learn about what exists.
    assert problem == (f"dataset.train_files: {path!r} is outside the directories this server "
                       f"allows (ORCH_DATA_ROOTS: {root}); use a location under one of them")
    assert allowed.check_source("dataset.train_files", str(root / "a.csv"), hub=False) is None


def test_home_and_dotdot_are_resolved_before_the_check(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    allowed = rules([str(tmp_path / "data")])
    assert allowed.check_path("model", "~/data/m") is None
    assert "outside" in str(allowed.check_path("model", "~/data/../m"))
    assert "relative path" in str(allowed.check_path("model", "data/../../m"))


@pytest.mark.parametrize(("storage", "words"), [
    ("/etc", "outside the directories"),
    ("/root/.ssh", "outside the directories"),
    ("{root}/../..", "outside the directories"),
    ("../../", "relative path"),
    ("webhdfs://127.0.0.1:9870/x", "webhdfs:// URLs are not allowed"),
    ("ftp://127.0.0.1/x", "ftp:// URLs are not allowed"),
    ("http://169.254.169.254/latest", "http:// URLs are not allowed"),
    ("s3://other-bucket/orch", "outside the URL prefixes"),
    ("s3://team/orchestra", "outside the URL prefixes"),
    ("s3://team/orch/../../x", "not a plain location"),
    ("s3://key:secret@team/orch", "not a plain location"),
    ("s3://team/orch::file:///etc", "not a plain location"),
    ("s3://team/orch?endpoint=http://evil", "not a plain location"),
    ("{root}/a\x00b", "holds control characters"),
])
def test_storage_outside_the_roots_is_refused(tmp_path: Path, storage: str, words: str) -> None:
    root = str(tmp_path / "jobs")
    allowed = rules([root], [root, "s3://team/orch"])
    problem = allowed.check_storage(storage.format(root=root))
    assert problem and problem.startswith("checkpoints.storage: ") and words in problem
    assert "\n" not in problem and "tracking_uri" not in problem  # its own field's advice only
    assert allowed.check_storage(f"{root}/team-a") is None
    assert allowed.check_storage("s3://team/orch/run-1") is None


def test_dataset_urls_need_an_allowed_scheme_and_a_url_root(tmp_path: Path) -> None:
    closed = rules([str(tmp_path)])
    assert "outside the URL prefixes" in str(
        closed.check_source("dataset.train_files", "s3://b/train.jsonl", hub=False))
    assert "ftp:// URLs are not allowed" in str(
        closed.check_source("dataset.train_files", "ftp://h/train.jsonl", hub=False))
    opened = rules([str(tmp_path), "s3://b/data"])
    assert opened.check_source("dataset.train_files", "s3://b/data/train.jsonl", hub=False) is None
    # file:// is a local path, under the directory rules.
    assert "outside the directories" in str(
        opened.check_source("dataset.train_files", "file:///etc/passwd", hub=False))


def test_hub_ids_are_allowed_unless_the_server_has_no_hub(tmp_path: Path) -> None:
    assert rules([str(tmp_path)]).check_source("model", "google-t5/t5-small") is None
    air_gapped = rules([str(tmp_path)], hub=False)
    assert "ORCH_ALLOW_HUB=false" in str(air_gapped.check_source("model", "google-t5/t5-small"))
    assert "ORCH_ALLOW_HUB=false" in str(air_gapped.check_source("dataset.name", "abisee/cnn"))
    assert "relative path" in str(air_gapped.check_source("model", "a/b/c"))
    assert "is a URL" in str(air_gapped.check_source("model", "s3://b/model", urls=False))


def test_every_path_field_of_a_spec_is_checked(tmp_path: Path, outside: Path) -> None:
    s = spec(model=str(outside / "m"), tokenizer=str(outside / "t"),
             dataset={"train_files": [str(outside / "a.jsonl")],
                      "eval_files": [str(outside / "b.jsonl")]},
             checkpoints__storage=str(outside))
    fields = [p.split(":")[0] for p in rules([str(tmp_path / "data")]).problems(s)]
    assert fields == ["model", "tokenizer", "dataset.train_files", "dataset.eval_files",
                      "checkpoints.storage"]
    named = spec(dataset={"name": str(outside / "ds"), "eval_split": "test"})
    assert [p.split(":")[0] for p in rules([str(tmp_path / "data")]).problems(named)] == [
        "model", "dataset.name"]


# -- settings -------------------------------------------------------------------------------
@pytest.mark.parametrize(("variable", "value", "words"), [
    ("ORCH_DATA_ROOTS", "data,/srv", "ORCH_DATA_ROOTS='data,/srv': data is a relative path"),
    ("ORCH_STORAGE_ROOTS", "webhdfs://h:1/x", "the scheme webhdfs:// is not in ORCH_ALLOWED_URL_SCHEMES"),
    ("ORCH_ALLOWED_URL_SCHEMES", "s3,file", "file:// names local files"),
    ("ORCH_ALLOWED_URL_SCHEMES", "s3,h t", "is not a URL scheme"),
    ("ORCH_ALLOW_HUB", "maybe", "ORCH_ALLOW_HUB='maybe'"),
])
def test_a_bad_root_setting_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                  variable: str, value: str, words: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        get_settings()
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_root_that_does_not_exist_stops_the_server(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, data_roots=f"{tmp_path},{tmp_path}/nope")
    with pytest.raises(SettingsError, match=r"ORCH_DATA_ROOTS: .*/nope is not an existing "
                                            r"directory; create it"):
        check_roots_exist(settings)
    check_roots_exist(Settings(home=tmp_path, storage_roots=f"{tmp_path},s3://b/p"))


# -- directories and permissions ------------------------------------------------------------
def test_a_job_directory_is_made_once_private_and_removed_when_the_job_is_not(
        tmp_path: Path) -> None:
    with new_job_dirs() as made:
        make_job_dir(tmp_path / "jobs" / "1", made)
    assert stat.S_IMODE((tmp_path / "jobs" / "1").stat().st_mode) == 0o700
    with pytest.raises(Conflict, match="already exists"), new_job_dirs() as made:
        make_job_dir(tmp_path / "jobs" / "2", made)
        make_job_dir(tmp_path / "jobs" / "1", made)
    assert not (tmp_path / "jobs" / "2").exists()  # rolled back with the job


def test_an_existing_home_of_ours_becomes_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    private_dir(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: never ours to close
    private_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    fresh = private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


def test_the_server_process_keeps_its_files_to_itself(tmp_path: Path) -> None:
    """prepare_server changes process-wide state (umask, working directory): a process of
    its own."""
    code = (
        "import os, sys\n"
        "from orchestrator.sandbox import prepare_server\n"
        "from orchestrator.settings import get_settings\n"
        "prepare_server(get_settings())\n"
        "open('probe', 'w').close()\n"
        "print(os.getcwd())\n"
        "print(oct(os.stat(sys.argv[1]).st_mode & 0o777))\n"
        "print(oct(os.stat('probe').st_mode & 0o777))\n"
    )
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    log = tmp_path / "server.log"
    with log.open("w") as out:
        os.chmod(log, 0o644)
        subprocess.run([sys.executable, "-c", code, str(home)], stdout=out, check=True,
                       cwd=tmp_path, env={**_clean_env(), "ORCH_HOME": str(home),
                                          "ORCH_AUTH": "users"}, timeout=60)
    cwd, home_mode, probe_mode = log.read_text().split()
    assert cwd == str(home / "cwd") and os.listdir(cwd) == ["probe"]
    assert home_mode == "0o700" and probe_mode == "0o600"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600  # its log
    assert (home / "data").is_dir() and (home / "jobs").is_dir()  # users mode's roots


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}


# -- preflight never quotes a file ------------------------------------------------------------
@pytest.mark.parametrize(("name", "content", "words"), [
    ("a.jsonl", f'"{SECRET}"\n', "line 1 is not a JSON object"),
    ("b.jsonl", f"{SECRET}\n", "not valid JSON"),
    ("c.json", f'["{SECRET}"]', "a JSON array whose entries are not objects"),
    ("d.csv", b"\xff\xfe" + SECRET.encode(), "not UTF-8 text"),
    ("e.parquet", SECRET, "not a valid parquet file"),
])
def test_a_file_that_cannot_be_parsed_is_never_quoted(tmp_path: Path, name: str,
                                                      content: str | bytes, words: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    problems = check_dataset(spec(dataset={"train_files": [str(path)], "eval_fraction": 0.1}))
    assert problems == [f"dataset.train_files: cannot read {path}: {words}"] or (
        words in problems[0] and len(problems) == 1), problems
    assert SECRET not in json.dumps(problems)


def test_columns_are_listed_only_for_a_file_inside_the_roots(tmp_path: Path,
                                                             outside: Path) -> None:
    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "t.csv").write_text("body,label\nx,1\n")
    allowed = rules([str(inside), str(ASSETS)])
    problems = check_dataset(spec(dataset={"train_files": [str(inside / "t.csv")],
                                           "eval_fraction": 0.1}))
    assert problems == ["dataset.text_column: column 'text' not in t.csv (columns: body, "
                        "label); set it to one of them"]
    problems = preflight(spec(dataset={"train_files": [str(outside / "secret.csv")],
                                       "eval_fraction": 0.1}), allowed)
    assert len(problems) == 1 and "outside the directories" in problems[0]
    assert SECRET not in problems[0] and "password" not in problems[0]


# -- through the API ------------------------------------------------------------------------
@pytest.fixture
def team(store: Store, tmp_path: Path) -> Iterator[tuple[TestClient, Store, Path]]:
    """The app with users mode's default rules written out: data under home/data and the
    assets, storage under home/jobs. (The roots rules do not depend on the auth mode once
    they are explicit; authentication is tested on its own.)"""
    home = get_settings().home
    (home / "data").mkdir(parents=True)
    settings = Settings(home=home, data_roots=f"{home}/data,{home}/jobs,{ASSETS}",
                        storage_roots=f"{home}/jobs")
    plane = ControlPlane(store, FakeExecutor(), Capacity(gpus=2, cpus=8, nodes=1),
                         interval=60, settings=settings)
    with TestClient(create_app(plane)) as client:
        yield as_local_user(client), store, home


def _no_trace(store: Store, home: Path) -> None:
    assert store.list_jobs() == []
    assert not (home / "jobs").exists() or list((home / "jobs").iterdir()) == []


def test_submit_refuses_a_spec_outside_the_roots_and_writes_nothing(
        team: tuple[TestClient, Store, Path], outside: Path) -> None:
    client, store, home = team
    answers = []
    for name in ("secret.csv", "missing.csv"):
        body = {"spec": spec(dataset={"train_files": [str(outside / name)],
                                      "eval_fraction": 0.1}).to_dict()}
        response = client.post("/jobs", json=body)
        assert response.status_code == 422, response.text
        answers.append(response.json()["detail"].replace(name, "X"))
    assert answers[0] == answers[1] and SECRET not in answers[0]
    assert "dataset.train_files" in answers[0] and f"ORCH_DATA_ROOTS: {home}/data" in answers[0]
    for storage in ("/etc", "/root/.ssh", f"{home}/jobs/../..", "webhdfs://127.0.0.1:1/x"):
        body = {"spec": spec(checkpoints__storage=storage).to_dict()}
        response = client.post("/jobs", json=body)
        assert response.status_code == 422 and "checkpoints.storage" in response.text
    _no_trace(store, home)


def test_the_server_never_connects_where_a_spec_says(team: tuple[TestClient, Store, Path]) -> None:
    client, store, home = team
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        for url in (f"webhdfs://127.0.0.1:{port}/x", f"ftp://127.0.0.1:{port}/x",
                    f"http://127.0.0.1:{port}/x"):
            body = {"spec": spec(checkpoints__storage=url).to_dict()}
            assert client.post("/jobs", json=body).status_code == 422
            body = {"spec": spec(dataset={"train_files": [f"{url}/t.jsonl"],
                                          "eval_fraction": 0.1}).to_dict()}
            assert client.post("/jobs", json=body).status_code == 422
        with pytest.raises(TimeoutError):
            listener.accept()
    _no_trace(store, home)


def test_submit_makes_the_job_directories_private_and_never_reuses_one(
        team: tuple[TestClient, Store, Path]) -> None:
    client, store, home = team
    storage = home / "jobs" / "team-a"
    body = {"spec": spec(checkpoints__storage=str(storage)).to_dict()}
    first = client.post("/jobs", json=body).json()
    for made in (storage / str(first["id"]), home / "jobs" / str(first["id"])):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700
    planted = home / "jobs" / str(first["id"] + 1)
    planted.mkdir()
    response = client.post("/jobs", json=body)
    assert response.status_code == 409 and "already exists" in response.text
    assert [j.id for j in store.list_jobs()] == [first["id"]]
    assert not (storage / str(first["id"] + 1)).exists()  # made, then rolled back
    planted.rmdir()
    assert client.post("/jobs", json=body).status_code == 201


def test_infinity_and_a_64_bit_priority_are_422(team: tuple[TestClient, Store, Path]) -> None:
    client, store, home = team
    body = spec().to_dict()
    for field, value, words in (("training", {"learning_rate": "Infinity"}, "finite number"),
                                ("priority", 2**31, "priority: must be <= 2147483647")):
        changed = {**body, field: {**body[field], **value} if isinstance(value, dict) else value}
        # Python's json writes Infinity bare, as a hostile client would.
        text = json.dumps({"spec": changed}).replace('"Infinity"', "Infinity")
        response = client.post("/jobs", content=text,
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and words in response.text, response.text
    _no_trace(store, home)
