"""Uneven tensor-parallel splits: split_sizes, offsets, ranges, ShardPlan."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pp1.pipelines.dit.sharding import ShardPlan, shard_offsets, shard_range, split_sizes


def test_krea_heads_over_three_ranks() -> None:
    assert split_sizes(40, 3) == (14, 13, 13)
    assert shard_offsets(40, 3) == (0, 14, 27)
    assert [shard_range(40, 3, r) for r in range(3)] == [(0, 14), (14, 27), (27, 40)]
    assert split_sizes(13824, 3) == (4608, 4608, 4608)
    assert split_sizes(8960, 3) == (2987, 2987, 2986)


@pytest.mark.parametrize(
    ("n", "parts", "expected"),
    [(8, 2, (4, 4)), (4, 3, (2, 1, 1)), (5, 1, (5,)), (2, 4, (1, 1, 0, 0)), (0, 2, (0, 0))],
)
def test_split_sizes_cases(n: int, parts: int, expected: tuple[int, ...]) -> None:
    assert split_sizes(n, parts) == expected


def test_split_errors() -> None:
    with pytest.raises(ValueError, match="parts"):
        split_sizes(4, 0)
    with pytest.raises(ValueError, match="n must be"):
        split_sizes(-1, 2)
    with pytest.raises(ValueError, match="outside mesh"):
        shard_range(4, 2, 2)


@given(st.integers(0, 100_000), st.integers(1, 64))
def test_split_properties(n: int, parts: int) -> None:
    sizes = split_sizes(n, parts)
    assert len(sizes) == parts and sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1
    assert list(sizes) == sorted(sizes, reverse=True)
    ranges = [shard_range(n, parts, r) for r in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))


def test_shard_plan_krea_tp3() -> None:
    plans = [ShardPlan(r, 3, num_heads=40, head_dim=128, ffn_dim=13824) for r in range(3)]
    assert [p.local_heads for p in plans] == [14, 13, 13]
    assert [p.head_features for p in plans] == [(0, 1792), (1792, 3456), (3456, 5120)]
    assert [p.local_ffn for p in plans] == [4608] * 3
    assert "heads [14,27)" in plans[1].describe()
