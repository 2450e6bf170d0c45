"""The user's ``where`` row filter: parsed, checked against an allowlist, and re-deparsed before any use.

Why a parser and not a lexical gate: the filter comes from a DAG form that anyone allowed to trigger the DAG can
fill, and it runs as the table owner's role in the planning and fill queries. A pattern match cannot tell
``length(pg_read_file('/etc/hostname')) > 0`` from ``length(name) > 0``, nor how a backslash in a string is read
when ``standard_conforming_strings`` is off. So the text is parsed with PostgreSQL's own grammar (libpg_query via
``pglast``), accepted only when it is a row filter over the table's own columns (column references, constants,
casts to built-in types, boolean/comparison/arithmetic operators, IN/BETWEEN/IS NULL/LIKE and a short list of
side-effect-free functions), and what reaches the server is the tree printed back by ``pglast`` with every function
and type qualified by ``pg_catalog`` - never the user's text. :func:`check_on_server` then confirms on the server
that every function used is immutable or stable and returns one row (``pg_proc.provolatile``/``proretset``).

This module needs no database (tests/unit/core/convert/test_where.py); the server-side checks live in
``preflight.validate_where``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, SQLValueFunctionOp
from pglast.parser import ParseError
from pglast.stream import RawStream

from pg_partition.core.db.errors import InvalidInputError

PREFIX = "SELECT WHERE "
MAX_WHERE_CHARS = 4000
MAX_NODES = 500

# Side-effect-free functions a row filter may call (all in pg_catalog, all immutable or stable; the server confirms
# that with pg_proc.provolatile). Deliberately short: anything that reads files, sequences, settings, other
# sessions, large objects or other tables is absent by construction.
FUNCTIONS = frozenset({
    "now", "date_trunc", "date_part", "extract", "timezone", "make_date", "make_timestamp", "make_timestamptz",
    "make_interval", "to_timestamp", "to_date", "to_char", "age", "isfinite", "statement_timestamp",
    "transaction_timestamp",
    "lower", "upper", "length", "char_length", "octet_length", "btrim", "ltrim", "rtrim", "substring", "substr",
    "left", "right", "starts_with", "replace", "concat",
    "abs", "round", "floor", "ceil", "ceiling", "trunc", "mod", "sign",
})
# Built-in types a cast may name (as pglast spells them after parsing, e.g. integer -> int4).
TYPES = frozenset({
    "int2", "int4", "int8", "numeric", "float4", "float8", "text", "varchar", "bpchar", "date", "timestamp",
    "timestamptz", "time", "timetz", "interval", "bool", "uuid",
})
LIKE_OPERATORS = frozenset({"~~", "!~~", "~~*", "!~~*"})
OPERATORS = frozenset({"=", "<>", "!=", "<", ">", "<=", ">=", "+", "-", "*", "/", "%", "||"}) | LIKE_OPERATORS
# Regular expressions (~, ~*, !~, !~*, SIMILAR TO) are refused: a pattern such as '^(a+)+$' can take time
# exponential in the row's length, per row, inside the fill's transactions. LIKE is kept, bounded: its pattern must
# be a constant (a column's value as a pattern would be data-chosen) with at most MAX_LIKE_WILDCARDS '%'s, which
# keeps PostgreSQL's backtracking matcher polynomial and small.
REGEX_OPERATORS = frozenset({"~", "!~", "~*", "!~*"})
MAX_LIKE_WILDCARDS = 4
EXPR_KINDS = frozenset({
    A_Expr_Kind.AEXPR_OP, A_Expr_Kind.AEXPR_IN, A_Expr_Kind.AEXPR_LIKE, A_Expr_Kind.AEXPR_ILIKE,
    A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_NOT_BETWEEN,
    A_Expr_Kind.AEXPR_DISTINCT, A_Expr_Kind.AEXPR_NOT_DISTINCT, A_Expr_Kind.AEXPR_NULLIF,
})
VALUE_FUNCTIONS = frozenset({
    SQLValueFunctionOp.SVFOP_CURRENT_DATE, SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP,
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP_N, SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP,
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP_N, SQLValueFunctionOp.SVFOP_CURRENT_TIME,
    SQLValueFunctionOp.SVFOP_CURRENT_TIME_N, SQLValueFunctionOp.SVFOP_LOCALTIME, SQLValueFunctionOp.SVFOP_LOCALTIME_N,
})
FIX = ("pass one boolean expression over the table's own columns, e.g. where=\"account_id = 123 AND created_at >= "
       "'2024-01-01'\"; allowed: columns of built-in types, constants, casts, AND/OR/NOT, comparisons, arithmetic, "
       f"IN, BETWEEN, IS NULL, LIKE with a constant pattern (at most {MAX_LIKE_WILDCARDS} '%'), PostgreSQL's own "
       "operators and the functions " + ", ".join(sorted(FUNCTIONS)))


@dataclass(frozen=True)
class WhereFilter:
    """A validated filter: ``sql`` is pglast's deparse of the checked tree (what the engine embeds), ``functions``
    the pg_catalog functions it calls (re-checked on the server), ``columns`` the columns it reads."""

    text: str
    sql: str
    functions: frozenset[str]
    columns: frozenset[str]


def _refuse(text: str, why: str) -> InvalidInputError:
    shown = text if len(text) <= 200 else text[:200] + "..."
    return InvalidInputError(f"the where filter {shown!r} was refused: {why}; nothing was run", fix=FIX)


def _children(node: Any) -> Iterator[Any]:
    if isinstance(node, tuple | list):
        yield from node
    elif isinstance(node, ast.Node):
        for name in node:  # pglast nodes iterate over their attribute names
            yield getattr(node, name)


def _check(node: Any, text: str, table_names: frozenset[tuple[str, ...]], found: dict[str, set[str]],
           budget: list[int]) -> None:
    """Walk the raw parse tree, refusing every node type that is not on the allowlist (deny by default)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _refuse(text, f"it is too complex (more than {MAX_NODES} parts)")
    if node is None or isinstance(node, str | int | float | bool):
        return
    if isinstance(node, tuple | list):
        for child in node:
            _check(child, text, table_names, found, budget)
        return
    if isinstance(node, ast.A_Const | ast.Integer | ast.Float | ast.String | ast.Boolean):
        return  # constants (their text is re-quoted by the deparser)
    if isinstance(node, ast.ColumnRef):
        fields = node.fields or ()
        if not all(isinstance(f, ast.String) for f in fields):
            raise _refuse(text, "'*' is not a column")
        names = tuple(f.sval for f in fields)
        if len(names) > 1 and names[:-1] not in table_names:
            raise _refuse(text, f"it names {'.'.join(names[:-1])!r}; only the table's own columns may be used")
        found["columns"].add(names[-1])
        return
    if isinstance(node, ast.BoolExpr | ast.NullTest | ast.BooleanTest | ast.CoalesceExpr | ast.MinMaxExpr
                  | ast.CaseExpr | ast.CaseWhen):
        for child in _children(node):
            _check(child, text, table_names, found, budget)
        return
    if isinstance(node, ast.A_Expr):
        op_names = tuple(n.sval for n in (node.name or ()) if isinstance(n, ast.String))
        if node.kind == A_Expr_Kind.AEXPR_SIMILAR or (op_names and op_names[-1] in REGEX_OPERATORS):
            raise _refuse(text, "regular expressions (~, ~*, !~, !~*, SIMILAR TO) are not allowed: their matching "
                          "time is unbounded; use LIKE with a constant pattern")
        if node.kind not in EXPR_KINDS:
            kind = node.kind.name if node.kind is not None else "?"
            raise _refuse(text, f"the operator form {kind} (e.g. = ANY(...)) is not allowed; use IN (...)")
        names = tuple(n.sval for n in (node.name or ()) if isinstance(n, ast.String))
        if len(names) != 1 or (node.kind == A_Expr_Kind.AEXPR_OP and names[0] not in OPERATORS):
            raise _refuse(text, f"the operator {'.'.join(names) or '?'} is not allowed")
        if names[0] in LIKE_OPERATORS:
            _check_like_pattern(node.rexpr, text)
        _check(node.lexpr, text, table_names, found, budget)
        _check(node.rexpr, text, table_names, found, budget)
        return
    if isinstance(node, ast.TypeCast):
        tn = node.typeName
        if tn is None:
            raise _refuse(text, "a cast without a type")
        names = tuple(n.sval for n in (tn.names or ()) if isinstance(n, ast.String))
        if (tn.setof or tn.pct_type or tn.arrayBounds or not names or names[-1] not in TYPES
                or (len(names) == 2 and names[0] != "pg_catalog") or len(names) > 2):
            raise _refuse(text, f"casts to {'.'.join(names) or '?'} are not allowed; cast to a built-in type "
                          "(integer, bigint, numeric, text, date, timestamp, timestamptz, interval, boolean)")
        tn.names = (ast.String(sval="pg_catalog"), ast.String(sval=names[-1]))
        _check(node.arg, text, table_names, found, budget)
        _check(tn.typmods, text, table_names, found, budget)
        return
    if isinstance(node, ast.FuncCall):
        names = tuple(n.sval for n in (node.funcname or ()) if isinstance(n, ast.String))
        name = names[-1] if names else "?"
        if len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog") or name not in FUNCTIONS:
            raise _refuse(text, f"the function {'.'.join(names)}() is not on the allowlist of side-effect-free "
                          "functions")
        if node.agg_star or node.agg_distinct or node.agg_order or node.agg_filter or node.over \
                or node.agg_within_group or node.func_variadic:
            raise _refuse(text, f"{name}() is used as an aggregate, window or variadic call")
        node.funcname = (ast.String(sval="pg_catalog"), ast.String(sval=name))
        found["functions"].add(name)
        _check(node.args, text, table_names, found, budget)
        return
    if isinstance(node, ast.SQLValueFunction):
        if node.op not in VALUE_FUNCTIONS:
            raise _refuse(text, f"{getattr(node.op, 'name', '?')} is not allowed (only current date/time values)")
        return
    if isinstance(node, ast.SubLink | ast.SelectStmt | ast.RangeVar):
        raise _refuse(text, "subqueries and other tables are not allowed")
    if isinstance(node, ast.ParamRef):
        raise _refuse(text, "parameters ($1) are not allowed")
    raise _refuse(text, f"{type(node).__name__} expressions are not allowed")


def _check_like_pattern(pattern: Any, text: str) -> None:
    value = pattern.val if isinstance(pattern, ast.A_Const) else None
    if not isinstance(value, ast.String):
        raise _refuse(text, "a LIKE pattern must be a string constant (not a column, an expression or ESCAPE)")
    if (value.sval or "").count("%") > MAX_LIKE_WILDCARDS:
        raise _refuse(text, f"a LIKE pattern with more than {MAX_LIKE_WILDCARDS} '%' wildcards can take very long "
                      "to match; simplify it")


# Source positions, and whether a call was written as SQL syntax (``x AT TIME ZONE 'UTC'``) or as a plain call
# (``pg_catalog.timezone('UTC', x)``): neither changes what the expression means.
SHAPE_SKIP = frozenset({"location", "rexpr_list_start", "rexpr_list_end", "funcformat"})


def _shape(node: Any) -> Any:
    """The tree without source positions, to compare a deparse with the tree it came from."""
    if isinstance(node, dict):
        return {k: _shape(v) for k, v in node.items() if k not in SHAPE_SKIP}
    if isinstance(node, list | tuple):
        return [_shape(v) for v in node]
    return node


def parse(text: str, *, table: Iterable[str] = (), columns: Iterable[str] | None = None) -> WhereFilter:
    """Parse and check ``text``; ``table`` is (schema, name) so ``t.col``/``schema.t.col`` references are
    accepted; ``columns`` (when given) are the table's columns and any other column name is refused."""
    if not isinstance(text, str):
        raise InvalidInputError(f"the where filter must be text, not {type(text).__name__}", fix=FIX)
    text = text.strip()
    if len(text) > MAX_WHERE_CHARS:
        raise _refuse(text, f"it is longer than {MAX_WHERE_CHARS} characters")
    if "\x00" in text:
        raise _refuse(text, "it contains a NUL character")
    try:
        # The text sits in a SELECT of its own and the result must be exactly that one SELECT with only a WHERE:
        # a filter that closes the statement (";"), adds a UNION, a FROM or a LIMIT is refused below.
        stmts = parse_sql(PREFIX + text)
    except ParseError as exc:
        # positions are counted in the user's text, not in the "SELECT WHERE " it was parsed in
        detail = re.sub(r"at index (\d+)", lambda m: f"at character {max(int(m.group(1)) - len(PREFIX), 0) + 1}",
                        str(exc))
        raise _refuse(text, f"it is not valid SQL ({detail})") from None
    if len(stmts) != 1:
        raise _refuse(text, "it holds more than one statement")
    stmt = stmts[0].stmt
    if (not isinstance(stmt, ast.SelectStmt) or stmt.whereClause is None or stmt.targetList or stmt.fromClause
            or getattr(stmt.op, "name", None) != "SETOP_NONE" or stmt.groupClause or stmt.havingClause
            or stmt.sortClause or stmt.limitCount or stmt.limitOffset or stmt.lockingClause or stmt.withClause
            or stmt.windowClause or stmt.distinctClause or stmt.intoClause or stmt.valuesLists):
        raise _refuse(text, "it is not a single boolean expression (it adds clauses or statements)")
    parts = tuple(table)
    table_names = frozenset({parts[-1:], parts[-2:]}) if parts else frozenset()
    found: dict[str, set[str]] = {"columns": set(), "functions": set()}
    where = stmt.whereClause
    _check(where, text, table_names, found, [MAX_NODES])
    if columns is not None:
        unknown = sorted(found["columns"] - set(columns))
        if unknown:
            raise _refuse(text, f"column(s) {', '.join(unknown)} do not exist in the table")
    printed = RawStream()(where)
    # The deparse must mean exactly the checked tree: parse it again and compare (positions aside).
    again = parse_sql(PREFIX + printed)
    again_stmt = again[0].stmt if len(again) == 1 else None
    if not isinstance(again_stmt, ast.SelectStmt) or again_stmt.whereClause is None \
            or _shape(again_stmt.whereClause(skip_none=True)) != _shape(where(skip_none=True)):
        raise _refuse(text, "it could not be printed back unambiguously")  # pragma: no cover - deparser bug
    return WhereFilter(text=text, sql=printed, functions=frozenset(found["functions"]),
                       columns=frozenset(found["columns"]))


# --- on the server: what the names resolve to ----------------------------------------------------------------

PROBE_VIEW = "pg_partition_where_probe"

# What the filter's expression depends on once PostgreSQL has resolved it (operators, functions incl. implicit
# casts, types of constants). PostgreSQL records no dependency on its own pinned (initdb-created) objects, so
# every row here is something a user or an extension created.
_RESOLVED_SQL = """
WITH d AS (
  SELECT d.refclassid, d.refobjid FROM pg_depend d JOIN pg_rewrite r
    ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
  WHERE r.ev_class = %s::regclass)
SELECT 'operator', format('%%s.%%s(%%s,%%s)', o.oprnamespace::regnamespace, o.oprname,
                          format_type(o.oprleft, NULL), format_type(o.oprright, NULL))
  FROM d JOIN pg_operator o ON d.refclassid = 'pg_operator'::regclass AND o.oid = d.refobjid
UNION ALL
SELECT 'function', format('%%s.%%s()', p.pronamespace::regnamespace, p.proname)
  FROM d JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND p.oid = d.refobjid
UNION ALL
SELECT 'type', format('%%s.%%s', t.typnamespace::regnamespace, t.typname)
  FROM d JOIN pg_type t ON d.refclassid = 'pg_type'::regclass AND t.oid = d.refobjid
ORDER BY 1, 2"""


def check_on_server(conn: psycopg.Connection[Any], table: Any, checked: WhereFilter, fragment: Any) -> None:
    """Refuse a filter whose names resolve on the server to anything but PostgreSQL's own built-ins.

    The parser cannot know what ``a = b`` means: with a column of a user-defined type (a domain, an enum) or an
    operator the user created for a pair of built-in types PostgreSQL has none for (``bigint = text``), the plain
    ``=`` calls the user's function, which may do anything as the table owner. So (1) every column the filter
    reads must have a built-in type (pg_catalog, not a domain), and (2) the filter is resolved by PostgreSQL itself
    (``CREATE TEMP VIEW ... WHERE <filter>`` in a transaction that is always rolled back: parse analysis only,
    nothing is executed or planned) and every operator, function or type it depends on must be a built-in one.
    ``table`` is the QualifiedName, ``fragment`` the SQL of the validated filter. Raises InvalidInputError.
    """
    from psycopg import sql

    if checked.columns:
        rows = conn.execute(
            """SELECT a.attname, format('%%s.%%s', t.typnamespace::regnamespace, t.typname)
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
               WHERE a.attrelid = %s::regclass AND a.attname = ANY(%s) AND NOT a.attisdropped
                 AND (t.typnamespace <> 'pg_catalog'::regnamespace OR t.typtype = 'd')
               ORDER BY 1""", (table.ident.as_string(conn), sorted(checked.columns))).fetchall()
        if rows:
            col, typ = rows[0]
            raise _refuse(checked.text, f"column {col} has the user-defined type {typ}; a filter may only read "
                          "columns of PostgreSQL's built-in types (a user-defined type's operators run its "
                          "owner's code)")
    probe = sql.SQL("CREATE TEMP VIEW {} AS SELECT 1 FROM {} WHERE {}").format(
        sql.Identifier(PROBE_VIEW), table.ident, fragment)
    found: list[tuple[str, str]] = []
    try:
        with conn.transaction():  # a savepoint when the caller has a transaction open; rolled back either way
            conn.execute("SET LOCAL statement_timeout = '10s'")
            conn.execute(probe)
            found = [(r[0], r[1]) for r in conn.execute(_RESOLVED_SQL, (f"pg_temp.{PROBE_VIEW}",)).fetchall()]
            raise _Rollback
    except _Rollback:
        pass
    except psycopg.errors.InsufficientPrivilege as exc:
        raise InvalidInputError(
            f"the where filter {checked.text!r} cannot be checked: {(exc.diag.message_primary or '').strip()}; "
            "nothing was run",
            fix="GRANT TEMPORARY ON DATABASE <db> TO <the role pg-partition connects as> (the check resolves the "
            "filter in a temporary view that is rolled back), or convert without a where filter") from None
    except psycopg.Error as exc:
        raise InvalidInputError(
            f"the where filter {checked.text!r} is not a valid boolean expression on {table}: "
            f"{(exc.diag.message_primary or str(exc)).strip()}",
            fix="pass one boolean expression over the table's columns, e.g. where=\"account_id = 123\"",
        ) from None
    for kind, name in found:
        what = {"operator": "not a built-in operator", "function": "not a built-in function",
                "type": "not a built-in type"}[kind]
        raise _refuse(checked.text, f"it uses the {kind} {name}, which is {what} of PostgreSQL (pg_catalog); "
                      "a user-defined one may run its owner's code")


class _Rollback(Exception):
    """Raised inside ``conn.transaction()`` to roll the probe back on purpose."""
