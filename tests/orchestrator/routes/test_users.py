"""A team server's people: admins manage users and tokens (each change audited), a token is
shown once, identity comes from the token alone, and cancel/resume/priority/GPU caps hold
for the real user."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from orchestrator.models import UserToken, utcnow
from orchestrator.states import JobState
from orchestrator.store import Store
from tests.support import REPO, mlm_spec_dict, team_api, wait_until

Headers = dict[str, dict[str, str]]


@pytest.fixture
def team(store: Store, monkeypatch: pytest.MonkeyPatch,
         tmp_path: Path) -> Iterator[tuple[TestClient, Headers]]:
    monkeypatch.setenv("ORCH_AUTH", "users")
    # Where a team server lets specs read and write (the test assets, this test's files).
    monkeypatch.setenv("ORCH_DATA_ROOTS", str(REPO / "jobs" / "assets"))
    monkeypatch.setenv("ORCH_STORAGE_ROOTS", str(tmp_path))
    with team_api(store) as (client, headers):
        yield client, headers


def submit(client: TestClient, headers: dict[str, str], **changes: object) -> dict:
    spec = {**mlm_spec_dict(), **changes}
    answer = client.post("/jobs", json={"spec": spec}, headers=headers)
    return {"status": answer.status_code, **answer.json()}


def test_an_admin_manages_users_and_each_change_is_audited(team: tuple[TestClient, Headers]) -> None:
    client, h = team
    made = client.post("/users", headers=h["root"], json={"name": "carol", "gpu_cap": 2,
                                                          "max_priority": 5})
    assert made.status_code == 201, made.text
    carol = {"Authorization": f"Bearer {made.json()['token']['token']}"}
    me = client.get("/whoami", headers=carol).json()
    assert me == {"name": "carol", "role": "user", "auth": "users", "gpu_cap": 2,
                  "max_priority": 5}
    laptop = client.post("/users/carol/tokens", headers=h["root"],
                         json={"name": "laptop", "expires_in_days": 30})
    assert laptop.status_code == 201 and laptop.json()["expires_at"]
    # Listing shows tokens by name, never the tokens themselves.
    listed = client.get("/users", headers=h["root"]).json()
    assert made.json()["token"]["token"] not in str(listed)
    assert [t["name"] for t in next(u for u in listed if u["name"] == "carol")["tokens"]] == [
        "token-1", "laptop"]
    revoked = client.post("/users/carol/revoke", headers=h["root"], json={"token": "token-1"})
    assert revoked.json() == {"user": "carol", "revoked": ["token-1"]}
    assert client.get("/whoami", headers=carol).status_code == 401
    carol = {"Authorization": f"Bearer {laptop.json()['token']}"}
    assert client.get("/whoami", headers=carol).status_code == 200
    assert client.post("/users/carol/disable", headers=h["root"]).json()["disabled_at"]
    answer = client.get("/whoami", headers=carol)
    assert answer.status_code == 401 and "disabled" in answer.json()["detail"]
    trail = [(e["actor"], e["action"], e["target"])
             for e in client.get("/audit", headers=h["root"], params={"target": "carol"}).json()]
    assert trail == [("root", "user.disable", "carol"), ("root", "token.revoke", "carol"),
                     ("root", "token.issue", "carol"), ("root", "user.create", "carol")]


def test_only_admins_manage_users(team: tuple[TestClient, Headers], store: Store) -> None:
    client, h = team
    for method, path, body in (("POST", "/users", {"name": "eve", "role": "admin"}),
                               ("GET", "/users", None), ("GET", "/audit", None),
                               ("POST", "/users/bob/tokens", {}),
                               ("POST", "/users/alice/revoke", {}),
                               ("POST", "/users/alice/disable", None)):
        answer = client.request(method, path, headers=h["bob"], json=body)
        assert answer.status_code == 403 and "only an admin" in answer.json()["detail"], path
    assert store.get_user("eve") is None and store.get_user("alice").disabled_at is None  # type: ignore[union-attr]
    assert {e.actor for e in store.audit_events()} == {"op"}  # only the fixture's changes


def test_bad_user_input_is_one_line_naming_the_field(team: tuple[TestClient, Headers],
                                                     store: Store) -> None:
    client, h = team
    for body, field in (({"name": "Eve"}, "name: 'Eve' is not a user name"),
                        ({"name": "eve", "role": "root"}, "role"),
                        ({"name": "eve", "gpu_cap": -1}, "gpu_cap"),
                        ({"name": "eve", "max_priority": 2**31}, "max_priority"),
                        ({"name": "eve", "expires_in_days": 0}, "expires_in_days"),
                        ({"name": "eve", "surprise": 1}, "surprise"),
                        ({"name": "alice"}, "user alice already exists")):
        answer = client.post("/users", headers=h["root"], json=body)
        assert answer.status_code in (409, 422), answer.text
        assert field in answer.json()["detail"] and "\n" not in answer.json()["detail"]
    assert store.get_user("eve") is None
    assert {e.actor for e in store.audit_events()} == {"op"}  # only the fixture's changes


def test_an_expired_token_is_refused(team: tuple[TestClient, Headers], store: Store) -> None:
    client, h = team
    issued = store.issue_token("bob", actor="root", expires_at=utcnow() + timedelta(days=1))
    with store._writing() as session:  # a day passes
        session.execute(update(UserToken).where(UserToken.name == issued.name)
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
    answer = client.get("/jobs", headers={"Authorization": f"Bearer {issued.token}"})
    assert answer.status_code == 401 and "expired" in answer.json()["detail"]
    assert client.get("/jobs", headers=h["bob"]).status_code == 200  # bob's other token


def test_the_owner_is_the_token_holder_whatever_the_headers_say(
        team: tuple[TestClient, Headers]) -> None:
    client, h = team
    job = submit(client, {**h["bob"], "X-Orch-User": "alice"})
    assert job["status"] == 201 and job["owner"] == "bob"
    # Teammates read each other's jobs.
    assert client.get(f"/jobs/{job['id']}", headers=h["alice"]).json()["owner"] == "bob"
    assert [j["id"] for j in client.get("/jobs", headers=h["alice"]).json()] == [job["id"]]


def test_only_the_owner_or_an_admin_cancels(team: tuple[TestClient, Headers], store: Store) -> None:
    client, h = team
    job = submit(client, h["alice"])["id"]
    wait_until(lambda: store.require_job(job).state == JobState.PENDING, 10, "the admission")
    before = [(e.to_state, e.reason) for e in store.events(job)]
    refused = client.post(f"/jobs/{job}/cancel", headers=h["bob"])
    assert refused.status_code == 403 and "belongs to alice" in refused.json()["detail"]
    assert [(e.to_state, e.reason) for e in store.events(job)] == before  # nothing changed
    done = client.post(f"/jobs/{job}/cancel", headers=h["root"])
    assert done.status_code == 200 and done.json()["cancelled"]
    event = store.events(job)[-1]
    assert event.to_state == JobState.CANCELLED and event.details == {"user": "root"}
    mine = submit(client, h["bob"])["id"]
    assert client.post(f"/jobs/{mine}/cancel", headers=h["bob"]).json()["cancelled"]


def test_an_admin_resumes_for_the_owner(team: tuple[TestClient, Headers], store: Store,
                                        tmp_path: Path) -> None:
    client, h = team
    job = submit(client, h["alice"])["id"]
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"w")
    (checkpoint / "trainer_state.json").write_text("{}")
    store.add_checkpoint(job, attempt=1, step=3, path=str(checkpoint), size_bytes=1, metrics={})
    client.post(f"/jobs/{job}/cancel", headers=h["alice"])
    jobs_before = len(store.list_jobs())
    refused = client.post(f"/jobs/{job}/resume", headers=h["bob"])
    assert refused.status_code == 403 and len(store.list_jobs()) == jobs_before
    resumed = client.post(f"/jobs/{job}/resume", headers=h["root"])
    assert resumed.status_code == 201, resumed.text
    new = resumed.json()
    assert new["owner"] == "alice" and new["parent_job_id"] == job
    first = store.events(new["id"])[0]
    assert first.details and first.details["user"] == "root"
    assert first.reason.startswith("submitted by root for alice: resume of job")


def test_priority_above_the_users_limit_is_refused(team: tuple[TestClient, Headers],
                                                   store: Store) -> None:
    client, h = team
    # bob's own limit is 10; alice has the server's default, ORCH_MAX_PRIORITY (100).
    refused = submit(client, h["bob"], priority=11)
    assert refused["status"] == 422
    assert "priority: 11 is above bob's limit of 10" in refused["detail"]
    assert submit(client, h["alice"], priority=100)["status"] == 201
    assert "limit of 100" in submit(client, h["alice"], priority=101)["detail"]
    huge = submit(client, h["root"], priority=2**31)
    assert huge["status"] == 422 and "priority" in huge["detail"]
    assert [j.priority for j in store.list_jobs()] == [100]


def test_a_job_bigger_than_its_owners_gpu_cap_is_refused(team: tuple[TestClient, Headers],
                                                         store: Store) -> None:
    client, h = team
    big = {**mlm_spec_dict()["resources"], "gpus": 2, "workers": 2}
    refused = submit(client, h["alice"], resources=big)  # alice's cap is 1
    assert refused["status"] == 422
    assert "the job asks for 2 GPUs but alice may hold at most 1 at once" in refused["detail"]
    assert submit(client, h["bob"], resources=big)["status"] == 201  # no cap for bob
    assert [j.owner for j in store.list_jobs()] == ["bob"]
