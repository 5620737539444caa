"""The job state machine's transition table."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.states import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    JobState,
    can_transition,
)

# The whole table, written out: any change to the state machine must change this test.
ALLOWED = {
    (JobState.QUEUED, JobState.PENDING),
    (JobState.QUEUED, JobState.FAILED),
    (JobState.QUEUED, JobState.CANCELLED),
    (JobState.PENDING, JobState.RUNNING),
    (JobState.PENDING, JobState.QUEUED),
    (JobState.PENDING, JobState.FAILED),
    (JobState.PENDING, JobState.CANCELLED),
    (JobState.RUNNING, JobState.SUCCEEDED),
    (JobState.RUNNING, JobState.FAILED),
    (JobState.RUNNING, JobState.CANCELLED),
    (JobState.RUNNING, JobState.QUEUED),  # retry after an infrastructure failure
}


def test_terminal_states() -> None:
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED} == TERMINAL_STATES
    for state in JobState:
        assert state.is_terminal == (state in TERMINAL_STATES)


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_terminal_states_have_no_exits(state: JobState) -> None:
    assert state not in TRANSITIONS
    assert not any(can_transition(state, target) for target in JobState)


@pytest.mark.parametrize(("source", "target"), list(itertools.product(JobState, JobState)))
def test_transition_table(source: JobState, target: JobState) -> None:
    assert can_transition(source, target) == ((source, target) in ALLOWED)


def test_table_matches_transitions_dict() -> None:
    listed = {(s, t) for s, targets in TRANSITIONS.items() for t in targets}
    assert listed == ALLOWED


def test_no_self_loops_and_no_way_back_to_running() -> None:
    assert not any(can_transition(s, s) for s in JobState)
    assert [s for s in JobState if can_transition(s, JobState.RUNNING)] == [JobState.PENDING]


def test_active_states_are_not_terminal() -> None:
    assert {JobState.PENDING, JobState.RUNNING} == ACTIVE_STATES
    assert not ACTIVE_STATES & TERMINAL_STATES


def test_values_are_strings() -> None:
    assert JobState("queued") is JobState.QUEUED
    assert str(JobState.RUNNING) == "running"
    assert JobState.FAILED == "failed"  # str enum: compares equal to the stored value
