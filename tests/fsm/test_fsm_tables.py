"""Every machine of the diagram registry, through its table: every (state, event) pair, the
failed state from every non-terminal state, and the table's shape."""

from __future__ import annotations

import pytest
from fsm_roles_helpers import build, force_state

from pp1.fsm.base import FAIL, FAILED, InvalidEvent, ProtocolMachine
from pp1.fsm.diagrams import machine_classes

CLASSES = machine_classes()
IDS = [c.NAME for c in CLASSES]


def test_registry_holds_every_machine_of_b1() -> None:
    names = set(IDS)
    assert {"lifecycle_front", "lifecycle_leader", "lifecycle_worker", "lifecycle_tp_rank0", "leader",
            "worker"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_table_is_well_formed(cls: type[ProtocolMachine]) -> None:
    states = set(cls.STATES)
    assert len(states) == len(cls.STATES), "duplicate state"
    assert cls.INITIAL in states and FAILED in states and FAILED in cls.TERMINAL
    assert states >= cls.TERMINAL
    for t in cls.transition_dicts():
        src = t["source"] if isinstance(t["source"], list) else [t["source"]]
        assert set(src) <= states, t
        assert t["dest"] in states, t
        assert not set(src) & cls.TERMINAL, f"a terminal state has an outgoing transition: {t}"


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_every_state_reachable_from_initial(cls: type[ProtocolMachine]) -> None:
    seen, todo = {cls.INITIAL}, [cls.INITIAL]
    while todo:
        s = todo.pop()
        for e in cls.events():
            d = cls.next_state(s, e)
            if d is not None and d not in seen:
                seen.add(d)
                todo.append(d)
    assert seen == set(cls.STATES)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_every_state_event_pair(cls: type[ProtocolMachine]) -> None:
    """A listed transition moves to the table's destination; anything else raises InvalidEvent and
    leaves the state untouched."""
    for state in cls.STATES:
        for event in cls.events():
            m = build(cls)
            force_state(m, state)
            dest = cls.next_state(state, event)
            if dest is None:
                with pytest.raises(InvalidEvent) as err:
                    m.fire(event)
                assert m.state == state, (state, event)
                assert (err.value.state, err.value.event, err.value.machine) == (state, event, cls.NAME)
            else:
                assert m.fire(event) == dest, (state, event)
                assert m.state == dest


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_failed_from_every_non_terminal_state_records_cause(cls: type[ProtocolMachine]) -> None:
    for state in cls.non_terminal():
        assert cls.next_state(state, FAIL) == FAILED
        m = build(cls)
        force_state(m, state)
        cause = m.fail_with(f"boom in {state}", "remote")
        assert m.state == FAILED and m.failure == cause
        assert (cause.rank, cause.phase, cause.reason, cause.kind) == (m.rank, state, f"boom in {state}", "remote")
        again = m.fail_with("later", "local")  # the first cause wins
        assert again == cause and m.failure == cause and m.state == FAILED


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_terminal_states_take_no_event(cls: type[ProtocolMachine]) -> None:
    for state in cls.TERMINAL:
        for event in cls.events():
            m = build(cls)
            force_state(m, state)
            with pytest.raises(InvalidEvent):
                m.fire(event)
            assert m.state == state


def test_the_first_failure_cause_wins() -> None:
    from fsm_roles_helpers import GEOMETRY

    from pp1.fsm.worker import WorkerLoopMachine

    w = WorkerLoopMachine(2, 5.0, 0.0, geometry=GEOMETRY)
    first = w.fail_with("the first", "remote")
    assert w.fail_with("a later one", "local") == first and w.failure == first and w.state == "failed"
