"""pack_items: the fill plan's items packed into a few work groups (one mapped fill task each)."""

from __future__ import annotations

from typing import Any

from pg_partition.core.convert.fill import pack_items


def _items(rows: list[int]) -> list[dict[str, Any]]:
    return [{"key": f"public.t_p{i:02d}", "rows": n, "batches": max(1, n // 1000), "range": ["a", "b"]}
            for i, n in enumerate(rows)]


def _flat(groups: list[dict[str, Any]]) -> list[str]:
    return [it["key"] for g in groups for it in g["items"]]


def test_a_small_table_gets_one_task_covering_every_partition() -> None:
    items = _items([4_000] * 26)  # 104k rows
    groups = pack_items(items, max_tasks=4, rows_per_task=500_000)
    assert len(groups) == 1
    assert _flat(groups) == [it["key"] for it in items]
    assert groups[0]["key"] == "public.t_p00 .. public.t_p25 (26 partitions)"
    assert groups[0]["rows"] == 104_000 and groups[0]["batches"] == 26 * 4


def test_a_large_table_gets_at_most_max_tasks_balanced_groups_of_neighbours() -> None:
    rows = [10_000, 200_000, 50_000, 400_000, 80_000, 80_000, 300_000, 20_000, 500_000, 60_000, 100_000, 200_000]
    items = _items(rows)
    groups = pack_items(items, max_tasks=4, rows_per_task=250_000)
    assert len(groups) == 4
    # every item exactly once, in plan order (each group is a run of neighbouring partitions)
    assert _flat(groups) == [it["key"] for it in items]
    assert sum(g["rows"] for g in groups) == sum(rows)
    # balanced: no group holds more than half of the rows (the largest single item is 500k of 2M)
    assert max(g["rows"] for g in groups) <= sum(rows) // 2
    labels = [g["key"] for g in groups]
    assert len(set(labels)) == 4 and all(".." in k or k.startswith("public.t_p") for k in labels)


def test_never_more_groups_than_items_and_deterministic() -> None:
    items = _items([1_000_000, 1_000_000])
    groups = pack_items(items, max_tasks=4, rows_per_task=100)
    assert [g["key"] for g in groups] == ["public.t_p00", "public.t_p01"]  # one-item groups keep the item's key
    assert pack_items(items, max_tasks=4, rows_per_task=100) == groups


def test_empty_plan_and_zero_rows() -> None:
    assert pack_items([], max_tasks=4) == []
    groups = pack_items(_items([0, 0, 0]), max_tasks=4)
    assert len(groups) == 1 and len(groups[0]["items"]) == 3


def test_id_chunks_are_called_items() -> None:
    chunks = [{"key": f"chunk-{i}", "rows": 10, "batches": 1, "range": None} for i in range(3)]
    assert pack_items(chunks, max_tasks=4)[0]["key"] == "chunk-0 .. chunk-2 (3 items)"
