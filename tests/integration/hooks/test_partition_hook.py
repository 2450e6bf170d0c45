"""PartitionHook.open: the session settings every pg-partition connection needs, whatever the server's defaults."""

from __future__ import annotations

from typing import Any

import psycopg

from pg_partition.hooks.partition import PartitionHook


def test_open_sets_the_session_in_one_round_trip_over_hostile_defaults(db: Any, conn: psycopg.Connection[Any],
                                                                      monkeypatch: Any) -> None:
    # defaults an operator of the database could have chosen: each would change what our statements mean
    conn.execute(f'ALTER DATABASE "{db.name}" SET standard_conforming_strings = off')
    conn.execute(f'ALTER DATABASE "{db.name}" SET row_security = on')
    conn.execute(f"ALTER DATABASE \"{db.name}\" SET application_name = 'someone_else'")
    sent: list[str] = []
    execute = psycopg.Connection.execute

    def counting(self: psycopg.Connection[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query))
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", counting)
    with PartitionHook(postgres_conn_id=db.conn_id).open() as hooked:
        setup = list(sent)
        row = hooked.execute("SELECT current_setting('application_name'), "
                             "current_setting('standard_conforming_strings'), current_setting('row_security')"
                             ).fetchone()
        assert hooked.execute("SELECT 'a\\b'").fetchone() == ("a\\b",)  # the backslash is a character
        assert hooked.autocommit
    assert row == ("pg_partition", "on", "off")
    assert len(setup) == 1, setup
