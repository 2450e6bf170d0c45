"""Issue 15 case 9: one fleet entry's failure never stops another entry's premake, detach or archive event."""

from __future__ import annotations

import pytest

from tests.dags.test_rotate_dag import make_events, partition_names, write_config


def test_a_bad_conn_id_does_not_silence_the_healthy_entry(db, tmp_path, monkeypatch, run_dag) -> None:
    """An entry whose conn_id does not exist fails its own tasks; the healthy database is still premade and
    detached, and ``announce_archive`` still emits the Asset event naming it (before: announce_archive failed
    on the missing connection and no event was emitted at all)."""
    months = ["2024-05", "2024-06", "2024-07", "2024-08", "2024-09", "2024-10", "2024-11"]
    with db.connect() as c:
        make_events(c, months)
    monkeypatch.delenv("AIRFLOW_CONN_PG_NO_SUCH_DB", raising=False)
    write_config(tmp_path, monkeypatch, f"""
defaults:
  table: public.events
  premake: 2
  retention: 3
  archive: {{bucket: archive-bucket, prefix: pg, aws_conn_id: aws_test}}
tables:
  - conn_id: pg_no_such_db
  - conn_id: {db.conn_id}
""")
    result = run_dag("pg_partition_rotate", {"today": "2024-11-20"})
    states = result.task_states
    # the bad entry fails loudly (so the run fails and the callback pages someone) ...
    assert result.state == "failed", states
    assert states["rotate.premake[0]"] == "failed" and states["rotate.detach[0]"] == "failed"
    # ... and the healthy one is rotated and announced all the same
    assert states["rotate.premake[1]"] == "success" and states["rotate.detach[1]"] == "success", states
    assert states["announce_archive"] == "success", states
    assert result.xcom("announce_archive") == [db.conn_id]
    with db.connect() as c:
        assert partition_names(c)[-1] == "events_202501"
        assert c.execute("SELECT count(*) FROM pgpartition.archive_queue WHERE status = 'pending'").fetchone() == (3,)

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        events = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                  .filter(AssetModel.name == "pg_partition_archive_pending",
                          AssetEvent.source_run_id == result.run_id).all())
        assert [e.extra for e in events] == [{"conn_ids": [db.conn_id]}]


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
