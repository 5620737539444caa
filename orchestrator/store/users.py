"""Users of a team server, their API tokens, and the audit trail of changes to them.

A token is made here (`orchestrator.tokens`), handed back in plain text exactly once and
stored only as its sha256. A user may hold several tokens, each with a name that is unique
among the user's live (unrevoked) tokens, so one can be revoked on its own.

Every change (a user created or disabled, a token issued or revoked) is one transaction
together with its audit event naming the actor, so no change goes unrecorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlmodel import col

from orchestrator.errors import Conflict, InvalidRequest, NotFound
from orchestrator.models import AuditEvent, UserAccount, UserRole, UserToken, utcnow
from orchestrator.store.base import StoreBase, check_aware
from orchestrator.tokens import USER_PREFIX, new_token, token_hash

# Lower case only: "Alice" and "alice" would look like one person in every listing.
USER_NAME = re.compile(r"[a-z][a-z0-9._-]{0,63}")
# No "/": `orch users revoke alice/laptop` splits on it.
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Issued:
    """A token just made: the only time its plain text exists outside the caller's hands."""

    user: str
    name: str
    token: str
    created_at: datetime
    expires_at: datetime | None


def check_user_name(name: Any) -> str:
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise InvalidRequest(f"name: {name!r} is not a user name; use 1 to 64 lower-case "
                             "letters, digits, '.', '_' or '-', starting with a letter")
    return name


def check_token_name(name: Any) -> str:
    if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
        raise InvalidRequest(f"token name: {name!r} is not valid; use 1 to 64 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit")
    return name


def _check_limits(gpu_cap: Any, max_priority: Any) -> None:
    if gpu_cap is not None and (isinstance(gpu_cap, bool) or not isinstance(gpu_cap, int)
                                or not 0 <= gpu_cap <= INT32_MAX):
        raise InvalidRequest(f"gpu_cap: must be a whole number >= 0, got {gpu_cap!r}")
    if max_priority is not None and (isinstance(max_priority, bool)
                                     or not isinstance(max_priority, int)
                                     or not INT32_MIN <= max_priority <= INT32_MAX):
        raise InvalidRequest(f"max_priority: must be a whole number from {INT32_MIN} to "
                             f"{INT32_MAX}, got {max_priority!r}")


def _check_expiry(expires_at: datetime | None) -> None:
    check_aware("expires_at", expires_at)
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidRequest(f"expires_at: {expires_at.isoformat()} is in the past")


def _check_actor(actor: Any) -> None:
    if not isinstance(actor, str) or not actor.strip() or len(actor) > 200:
        raise InvalidRequest("actor: who acts must be named (1 to 200 characters)")


class UsersStore(StoreBase):
    # -- changes (each one transaction, with its audit event) ---------------------------
    def create_user(self, name: str, *, actor: str, role: UserRole | str = UserRole.USER,
                    gpu_cap: int | None = None, max_priority: int | None = None,
                    token_name: str | None = None,
                    expires_at: datetime | None = None) -> tuple[UserAccount, Issued]:
        """A new user and their first token. Conflict when the name is taken."""
        check_user_name(name)
        _check_actor(actor)
        try:
            role = UserRole(role)
        except ValueError:
            raise InvalidRequest(f"role: one of admin, user; got {role!r}") from None
        _check_limits(gpu_cap, max_priority)
        if token_name is not None:
            check_token_name(token_name)
        _check_expiry(expires_at)
        try:
            with self._writing() as session:
                if self._account(session, name) is not None:
                    raise Conflict(f"user {name} already exists; issue another token with "
                                   f"`orch users token {name}`")
                account = UserAccount(name=name, role=role, gpu_cap=gpu_cap,
                                      max_priority=max_priority, created_at=utcnow())
                session.add(account)
                session.flush()
                issued = self._issue(session, account, token_name, expires_at)
                self._audit(session, actor, "user.create", name,
                            {"role": role.value, "gpu_cap": gpu_cap,
                             "max_priority": max_priority, "token": issued.name})
        except IntegrityError:
            raise Conflict(f"user {name} already exists") from None
        return account, issued

    def issue_token(self, name: str, *, actor: str, token_name: str | None = None,
                    expires_at: datetime | None = None) -> Issued:
        """Another token for an enabled user."""
        _check_actor(actor)
        if token_name is not None:
            check_token_name(token_name)
        _check_expiry(expires_at)
        try:
            with self._writing() as session:
                account = self._require_account(session, name)
                if account.disabled_at is not None:
                    raise Conflict(f"user {name} is disabled; a disabled user gets no tokens")
                issued = self._issue(session, account, token_name, expires_at)
                self._audit(session, actor, "token.issue", name,
                            {"token": issued.name, "expires_at": _iso(expires_at)})
        except IntegrityError:
            raise Conflict(f"user {name} already has a live token named {token_name}; pick "
                           "another --name") from None
        return issued

    def revoke_tokens(self, name: str, *, actor: str, token_name: str | None = None) -> list[str]:
        """Revoke one live token (by name) or all of a user's live tokens; the names revoked.
        NotFound when the user, or a live token of that name, does not exist."""
        _check_actor(actor)
        if token_name is not None:
            check_token_name(token_name)
        with self._writing() as session:
            account = self._require_account(session, name)
            live = [t for t in self._tokens(session, account) if t.revoked_at is None]
            doomed = [t for t in live if token_name is None or t.name == token_name]
            if token_name is not None and not doomed:
                raise NotFound(f"user {name} has no live token named {token_name}; "
                               "`orch users list` shows their tokens")
            self._revoke(session, doomed)
            names = [t.name for t in doomed]
            self._audit(session, actor, "token.revoke", name, {"tokens": names})
        return names

    def disable_user(self, name: str, *, actor: str) -> UserAccount:
        """Disable a user for good: every request with their tokens is refused, and the
        tokens are revoked too. The last enabled admin cannot be disabled (nobody could
        manage the server any more)."""
        _check_actor(actor)
        with self._writing() as session:
            account = self._require_account(session, name)
            if account.disabled_at is not None:
                raise Conflict(f"user {name} is already disabled")
            if account.role is UserRole.ADMIN:
                # Locked, so two admins disabling each other at once cannot both succeed.
                admins = session.scalars(
                    select(col(UserAccount.id)).where(col(UserAccount.role) == UserRole.ADMIN,
                                                 col(UserAccount.disabled_at).is_(None))
                    .with_for_update()).all()
                if len(admins) <= 1:
                    raise Conflict(f"{name} is the last enabled admin; make another admin "
                                   "first (orch users add NAME --admin)")
            account.disabled_at = utcnow()
            revoked = [t for t in self._tokens(session, account) if t.revoked_at is None]
            self._revoke(session, revoked)
            self._audit(session, actor, "user.disable", name,
                        {"tokens_revoked": [t.name for t in revoked]})
            session.flush()
        return account

    # -- reads ----------------------------------------------------------------------------
    def get_user(self, name: str) -> UserAccount | None:
        with self._read() as session:
            return self._account(session, name)

    def list_users(self) -> list[tuple[UserAccount, list[UserToken]]]:
        """Every user (by name) with all their tokens (oldest first; revoked ones too)."""
        with self._read() as session:
            accounts = list(session.scalars(select(UserAccount).order_by(col(UserAccount.name))))
            tokens = list(session.scalars(select(UserToken).order_by(col(UserToken.id))))
        by_user: dict[int, list[UserToken]] = {}
        for token in tokens:
            by_user.setdefault(token.user_id, []).append(token)
        return [(a, by_user.get(a.id or 0, [])) for a in accounts]

    def user_for_token(self, token: str) -> tuple[UserAccount, UserToken] | None:
        """The user and token row a plain token belongs to (revoked, expired or disabled
        ones too: the caller says which it is); None for a token nobody was given. Looked
        up by its hash, so the plain token never reaches the database."""
        query = (select(UserAccount, UserToken)
                 .join(UserToken, col(UserToken.user_id) == col(UserAccount.id))
                 .where(col(UserToken.token_hash) == token_hash(token)))
        with self._read() as session:
            row = session.execute(query).one_or_none()
        return None if row is None else (row[0], row[1])

    def gpu_caps(self) -> dict[str, int]:
        """name -> GPU cap of every user with a cap of their own (others: the default)."""
        query = select(col(UserAccount.name), col(UserAccount.gpu_cap)).where(
            col(UserAccount.gpu_cap).is_not(None))
        with self._read() as session:
            return {name: int(cap) for name, cap in session.execute(query) if cap is not None}

    def audit_events(self, *, limit: int = 100, target: str | None = None) -> list[AuditEvent]:
        """Newest first."""
        query = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(limit)
        if target is not None:
            query = query.where(col(AuditEvent.target) == target)
        with self._read() as session:
            return list(session.scalars(query))

    def count_users(self) -> int:
        with self._read() as session:
            return int(session.execute(select(func.count()).select_from(UserAccount)).scalar_one())

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _account(session: Session, name: str) -> UserAccount | None:
        return session.execute(select(UserAccount).where(
            col(UserAccount.name) == name)).scalar_one_or_none()

    def _require_account(self, session: Session, name: str) -> UserAccount:
        account = self._account(session, name)
        if account is None:
            raise NotFound(f"no user {name}; `orch users list` shows who there is")
        return account

    @staticmethod
    def _tokens(session: Session, account: UserAccount) -> list[UserToken]:
        return list(session.scalars(select(UserToken).where(
            col(UserToken.user_id) == account.id).order_by(col(UserToken.id))))

    def _issue(self, session: Session, account: UserAccount, token_name: str | None,
               expires_at: datetime | None) -> Issued:
        tokens = self._tokens(session, account)
        live = {t.name for t in tokens if t.revoked_at is None}
        if token_name is None:
            number = len(tokens) + 1
            while f"token-{number}" in live:
                number += 1
            token_name = f"token-{number}"
        elif token_name in live:
            raise Conflict(f"user {account.name} already has a live token named {token_name}; "
                           "pick another --name or revoke that one first")
        plain, now = new_token(USER_PREFIX), utcnow()
        assert account.id is not None
        session.add(UserToken(user_id=account.id, name=token_name, token_hash=token_hash(plain),
                              created_at=now, expires_at=expires_at))
        session.flush()
        return Issued(user=account.name, name=token_name, token=plain, created_at=now,
                      expires_at=expires_at)

    @staticmethod
    def _revoke(session: Session, tokens: list[UserToken]) -> None:
        if tokens:
            session.execute(update(UserToken).where(col(UserToken.id).in_([t.id for t in tokens]))
                            .values(revoked_at=utcnow())
                            .execution_options(synchronize_session=False))

    @staticmethod
    def _audit(session: Session, actor: str, action: str, target: str,
               details: dict[str, Any]) -> None:
        session.add(AuditEvent(at=utcnow(), actor=actor, action=action, target=target,
                               details=details))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
