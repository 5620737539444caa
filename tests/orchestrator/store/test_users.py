"""Users and their tokens in the store (SQLite and PostgreSQL): only hashes are kept, every
change is audited with its actor, and bad input changes nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text

from orchestrator.errors import Conflict, InvalidRequest, NotFound
from orchestrator.models import UserRole, utcnow
from orchestrator.store import Store
from orchestrator.tokens import USER_PREFIX, token_hash


def test_a_user_and_their_first_token(store: Store) -> None:
    account, issued = store.create_user("alice", actor="root (--database)", role="admin",
                                        gpu_cap=2, max_priority=50)
    assert (account.name, account.role, account.gpu_cap, account.max_priority) == (
        "alice", UserRole.ADMIN, 2, 50)
    assert issued.token.startswith(USER_PREFIX) and len(issued.token) > 40
    assert issued.name == "token-1" and issued.user == "alice"
    found = store.user_for_token(issued.token)
    assert found is not None and found[0].name == "alice" and found[1].name == "token-1"
    # Only the hash is stored: the plain token is nowhere in the database.
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM user_tokens")).all()
    assert issued.token not in str(rows) and token_hash(issued.token) in str(rows)
    assert store.user_for_token(issued.token + "x") is None
    [event] = store.audit_events()
    assert (event.actor, event.action, event.target) == ("root (--database)", "user.create",
                                                         "alice")
    assert event.details and event.details["role"] == "admin"


def test_several_tokens_named_and_revoked_one_by_one(store: Store) -> None:
    store.create_user("bob", actor="alice")
    laptop = store.issue_token("bob", actor="alice", token_name="laptop",
                               expires_at=utcnow() + timedelta(days=30))
    ci = store.issue_token("bob", actor="alice")
    assert ci.name == "token-3" and laptop.expires_at is not None
    with pytest.raises(Conflict, match="live token named laptop"):
        store.issue_token("bob", actor="alice", token_name="laptop")
    assert store.revoke_tokens("bob", actor="alice", token_name="laptop") == ["laptop"]
    found = store.user_for_token(laptop.token)
    assert found is not None and found[1].revoked_at is not None  # kept, marked revoked
    # A revoked token's name may be used again; the others are untouched.
    store.issue_token("bob", actor="alice", token_name="laptop")
    assert store.revoke_tokens("bob", actor="alice") == ["token-1", "token-3", "laptop"]
    with pytest.raises(NotFound, match="no live token named laptop"):
        store.revoke_tokens("bob", actor="alice", token_name="laptop")
    actions = [(e.action, e.actor) for e in reversed(store.audit_events())]
    assert actions == [("user.create", "alice"), ("token.issue", "alice"),
                       ("token.issue", "alice"), ("token.revoke", "alice"),
                       ("token.issue", "alice"), ("token.revoke", "alice")]


def test_disable_revokes_every_token_but_never_the_last_admin(store: Store) -> None:
    store.create_user("root", actor="op", role="admin")
    _, bob = store.create_user("bob", actor="root")
    with pytest.raises(Conflict, match="last enabled admin"):
        store.disable_user("root", actor="root")
    account = store.disable_user("bob", actor="root")
    assert account.disabled_at is not None
    found = store.user_for_token(bob.token)
    assert found is not None and found[0].disabled_at and found[1].revoked_at
    with pytest.raises(Conflict, match="already disabled"):
        store.disable_user("bob", actor="root")
    with pytest.raises(Conflict, match="disabled"):
        store.issue_token("bob", actor="root")
    store.create_user("carol", actor="root", role="admin")
    store.disable_user("root", actor="carol")  # another admin is left


def test_bad_input_is_refused_and_writes_nothing(store: Store) -> None:
    for call, message in (
        (lambda: store.create_user("Alice", actor="x"), "name: 'Alice' is not a user name"),
        (lambda: store.create_user("a/b", actor="x"), "is not a user name"),
        (lambda: store.create_user("a" * 65, actor="x"), "is not a user name"),
        (lambda: store.create_user("ann", actor="x", role="root"), "role: one of admin, user"),
        (lambda: store.create_user("ann", actor="x", gpu_cap=-1), "gpu_cap: must be"),
        (lambda: store.create_user("ann", actor="x", max_priority=2**31), "max_priority: must be"),
        (lambda: store.create_user("ann", actor="x", token_name="a/b"), "token name"),
        (lambda: store.create_user("ann", actor="x", expires_at=utcnow() - timedelta(days=1)),
         "expires_at: .* is in the past"),
        (lambda: store.create_user("ann", actor=""), "actor"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            call()
    assert store.list_users() == [] and store.audit_events() == []


def test_a_taken_name_or_a_missing_user(store: Store) -> None:
    store.create_user("ann", actor="x")
    with pytest.raises(Conflict, match="user ann already exists"):
        store.create_user("ann", actor="x", role="admin")
    for call in (lambda: store.issue_token("nobody", actor="x"),
                 lambda: store.revoke_tokens("nobody", actor="x"),
                 lambda: store.disable_user("nobody", actor="x")):
        with pytest.raises(NotFound, match="no user nobody"):
            call()
    assert [a.name for a, _ in store.list_users()] == ["ann"]
    assert len(store.audit_events()) == 1


def test_gpu_caps_of_users_who_have_one(store: Store) -> None:
    store.create_user("ann", actor="x", gpu_cap=1)
    store.create_user("bob", actor="x")
    store.create_user("cat", actor="x", gpu_cap=0)
    assert store.gpu_caps() == {"ann": 1, "cat": 0}
    assert [(a.name, [t.name for t in tokens]) for a, tokens in store.list_users()] == [
        ("ann", ["token-1"]), ("bob", ["token-1"]), ("cat", ["token-1"])]
