"""Issue 15, schema parity: who granted a privilege is carried over by the conversion (and back by the unswap),
as the non-superuser owner ``app_owner``, on every server version.

The source table's ACL holds grants by the owner (to alice and carol, with the grant option), a grant alice made
(SELECT to bob) and one carol made (SELECT to dave). ``app_owner`` is a member of alice (it may SET ROLE to her),
not of carol. After the swap: bob's SELECT is recorded as alice's grant (re-made as alice), so alice revoking it
still works; dave keeps his SELECT, recorded as the owner's (the session cannot act as carol), and a warning
names that grant and the commands that re-attribute it. Before the fix every grant was re-made by the owner:
alice's REVOKE left bob's SELECT in place.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest

from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.execute import Executor
from tests.support.convert import convert_all


def _acl(conn: psycopg.Connection[Any], table: str) -> set[tuple[str, str, bool, str]]:
    return {tuple(r) for r in conn.execute(  # type: ignore[misc]
        """SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type,
                  a.is_grantable, pg_get_userbyid(a.grantor)
           FROM aclexplode((SELECT relacl FROM pg_class WHERE oid = %s::regclass)) a""", (table,))}


def test_grantors_are_reproduced_where_the_session_can_act_as_them(owner_db, owner_conn, caplog) -> None:
    suffix = owner_db.name[-8:]
    alice, bob, carol, dave = (f"{n}_{suffix}" for n in ("alice", "bob", "carol", "dave"))
    conn = owner_conn
    conn.execute("CREATE TABLE grants_t (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, v text)")
    conn.execute("INSERT INTO grants_t (created_at, v) SELECT now() - (g % 60) * interval '1 day', 'x' "
                 "FROM generate_series(1, 500) g")
    with owner_db.admin_connect() as admin:
        for role in (alice, bob, carol, dave):
            admin.execute(f'CREATE ROLE "{role}" NOLOGIN')
        admin.execute(f'GRANT "{alice}" TO app_owner')  # app_owner may act as alice, not as carol
    conn.execute(f'GRANT SELECT, UPDATE ON grants_t TO "{alice}", "{carol}" WITH GRANT OPTION')
    conn.execute(f'SET ROLE "{alice}"')
    conn.execute(f'GRANT SELECT ON grants_t TO "{bob}"')
    conn.execute(f'GRANT UPDATE (v) ON grants_t TO "{bob}"')
    conn.execute("RESET ROLE")
    with owner_db.admin_connect() as admin:  # app_owner cannot act as carol: the DBA grants as her
        admin.execute(f'SET ROLE "{carol}"')
        admin.execute(f'GRANT SELECT ON grants_t TO "{dave}"')
    before = _acl(conn, "grants_t")
    assert (bob, "SELECT", False, alice) in before and (dave, "SELECT", False, carol) in before

    spec = ConvertSpec.create("grants_t", "created_at", period="month")
    with caplog.at_level(logging.WARNING, logger="pg_partition"):
        convert_all(conn, spec, capture=True)
    after = _acl(conn, "grants_t")
    expected = (before - {(dave, "SELECT", False, carol)}) | {(dave, "SELECT", False, "app_owner")}
    assert after == expected, (sorted(after - expected), sorted(expected - after))
    column = conn.execute("""SELECT pg_get_userbyid(a.grantor) FROM pg_attribute t, aclexplode(t.attacl) a
                             WHERE t.attrelid = 'grants_t'::regclass AND t.attname = 'v'""").fetchall()
    assert column == [(alice,)]
    warned = [r.getMessage() for r in caplog.records if "grantor not reproduced" in r.getMessage()]
    assert warned and all(carol in w and dave in w for w in warned), warned
    # at prep (naming the intermediate) and at the swap (naming the live table)
    assert any(f"run as {carol}: GRANT SELECT ON public.grants_t TO {dave}" in w for w in warned), warned
    # the point of the grantor: alice can take back what she granted
    conn.execute(f'SET ROLE "{alice}"')
    conn.execute(f'REVOKE SELECT ON grants_t FROM "{bob}"')
    conn.execute("RESET ROLE")
    assert not any(g == bob and p == "SELECT" for g, p, _, _ in _acl(conn, "grants_t"))

    conn.execute(f'SET ROLE "{alice}"')
    conn.execute(f'GRANT SELECT ON grants_t TO "{bob}"')
    conn.execute("RESET ROLE")
    convert.unswap(Executor(conn), spec)
    back = _acl(conn, "grants_t")
    # back as it was: dave's SELECT still carol's (the owner's stand-in grant is not added next to it)
    assert back == before, (sorted(back - before), sorted(before - back))


@pytest.fixture(autouse=True)
def _drop_roles(owner_db) -> Any:
    yield
    suffix = owner_db.name[-8:]
    with owner_db.cluster.primary.connect(autocommit=True) as admin:  # roles go once nothing refers to them
        admin.execute(f'DROP DATABASE IF EXISTS "{owner_db.name}" WITH (FORCE)')
        for n in ("alice", "bob", "carol", "dave"):
            admin.execute(f'DROP ROLE IF EXISTS "{n}_{suffix}"')
