"""RunConfig: consistent topologies only; parity reports per-key diffs."""

import pytest
from pydantic import ValidationError

from pp1.protocol.config import RunConfig, parity_report


def test_default_is_front_plus_two_mesh_ranks() -> None:
    cfg = RunConfig()
    assert (cfg.topology, cfg.world_size, cfg.mesh_global_ranks) == ("pp1", 3, (1, 2))
    assert cfg.front_rank == 0 and cfg.leader_rank == 1 and cfg.mesh_size == 2


def test_pure_tp_rank0_leads() -> None:
    cfg = RunConfig(topology="tp", world_size=2, mesh_global_ranks=(0, 1))
    assert cfg.front_rank is None and cfg.leader_rank == 0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"heartbeat_s": 2.0, "watchdog_s": 6.0}, "must exceed 3 x heartbeat_s"),
        ({"topology": "tp"}, "needs 3 mesh ranks"),
        ({"mesh_global_ranks": (0, 1)}, "rank 0 is the front"),
        ({"mesh_global_ranks": (1, 1)}, "distinct ranks"),
        ({"mesh_global_ranks": (1, 3)}, "distinct ranks"),
        ({"topology": "tp", "world_size": 2, "mesh_global_ranks": (1, 0)}, "rank 0 must be the mesh leader"),
        ({"recompute_every": -1}, "recompute_every"),
    ],
)
def test_inconsistent_configs_are_refused(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        RunConfig(**kwargs)


def test_parity_report_names_rank_and_key() -> None:
    a = RunConfig().model_dump(mode="json")
    b = RunConfig(preset="wan-1.3b-shape").model_dump(mode="json")
    assert parity_report([a, a, b]) == ["rank 2 vs rank 0: preset: 'tiny' != 'wan-1.3b-shape'"]
    assert RunConfig().digest() != RunConfig(preset="wan-1.3b-shape").digest()
