"""Every DAG in dags/ can be triggered from the Airflow form with its defaults.

Two rules, both Airflow's own: (1) the defaults validate against each param's JSON schema (``ParamsDict.validate``,
what the Trigger endpoint runs); (2) the Trigger form (airflow/ui, ``isRequired``) treats a param whose schema
``type`` does not allow ``null`` as required and disables the Trigger button when its value is empty (``None``,
``""`` or ``[]``). Optional params must be ``Param(None, type=["null", ...])``. The browser test
(tests/browser) checks the same on the rendered form; this one runs in a second with no server.
"""

from __future__ import annotations

from typing import Any

import pytest

from pg_partition.dag_factory.params import SECTIONS, is_blank, optional
from tests.conftest import REPO

EXPECTED_DAGS = {"pg_partition_advisor", "pg_partition_cost_report", "pg_partition_convert",
                 "pg_partition_rotate", "pg_partition_archive", "pg_partition_restore", "pg_partition_rollback"}


def _bag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag


@pytest.fixture(scope="module")
def dags(airflow_db: Any) -> dict[str, Any]:
    return dict(_bag().dags)


def _form_required(schema: dict[str, Any]) -> bool:
    """The UI's rule: a schema type that does not include null makes the field required."""
    kind = schema.get("type")
    return bool(kind) and (not isinstance(kind, list) or "null" not in kind)


def form_errors(dag: Any) -> list[str]:
    errors = []
    for name in dag.params:
        param = dag.params.get_param(name)
        if _form_required(param.schema) and param.value in (None, "", []):
            errors.append(f"{dag.dag_id}.{name}: required in the form but empty by default ({param.value!r})")
        if param.schema.get("section") not in SECTIONS:
            errors.append(f"{dag.dag_id}.{name}: no known section ({param.schema.get('section')!r})")
        if not param.description:
            errors.append(f"{dag.dag_id}.{name}: no description")
    return errors


def test_every_dag_is_checked(dags: dict[str, Any]) -> None:
    assert set(dags) == EXPECTED_DAGS


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_DAGS))
def test_default_params_validate_and_the_form_needs_nothing(dags: dict[str, Any], dag_id: str) -> None:
    dag = dags[dag_id]
    assert len(dag.params) > 0
    validated = dag.params.validate()  # Airflow's ParamsDict validation: raises ParamValidationError
    assert set(validated) == set(dag.params)
    assert form_errors(dag) == []


def test_the_checks_catch_the_reported_bug() -> None:
    """The bug of issue 17: ``Param("", type="string")`` is valid JSON schema but blocks the form."""
    from airflow.sdk import DAG, Param
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    with DAG("pgp_bad_form", schedule=None, params={
            "where": Param("", type="string", description="x", section=SECTIONS[0]),
            "slots": Param([], type="array", description="x", section=SECTIONS[0])}) as bad:
        pass
    assert bad.params.validate()  # JSON-schema valid...
    assert form_errors(bad) == [  # ...but required (and empty) in the form
        "pgp_bad_form.where: required in the form but empty by default ('')",
        "pgp_bad_form.slots: required in the form but empty by default ([])"]
    with pytest.raises(ParamValidationError):
        ParamsDict({"n": Param(None, type="integer")}).validate()


def test_optional_allows_null_everywhere_and_keeps_enums_valid() -> None:
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    p = optional("string", "d", SECTIONS[0], enum=["AES256", "aws:kms"], examples=["AES256"])
    assert p.schema["type"] == ["null", "string"] and p.schema["enum"] == [None, "AES256", "aws:kms"]
    assert p.schema["examples"] == ["AES256"] and p.value is None
    assert ParamsDict({"sse": p}).validate() == {"sse": None}
    assert p.resolve("aws:kms") == "aws:kms"
    with pytest.raises(ParamValidationError):
        p.resolve("rot13")


@pytest.mark.parametrize("value,blank", [(None, True), ("", True), ("None", True), (" null ", True), ("[]", True),
                                         ("0", False), ("x", False), (0, False)])
def test_is_blank_reads_template_rendered_nulls(value: Any, blank: bool) -> None:
    assert is_blank(value) is blank


def test_convert_form_has_the_issue_sections_in_order(dags: dict[str, Any]) -> None:
    params = dags["pg_partition_convert"].params
    sections = [params.get_param(n).schema["section"] for n in params]
    seen = list(dict.fromkeys(sections))
    assert seen == ["What to convert", "How fast", "Safety", "Change capture", "Replication lag", "Advanced"]


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_DAGS))
def test_every_mapped_task_has_a_label(dags: dict[str, Any], dag_id: str) -> None:
    """Mapped task instances show their map_index_template in the grid (a partition, a table) instead of 0..N.
    BaseOperator.__init__ resets a class attribute to None, so it must reach the task through partial()."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    mapped = [t for t in dags[dag_id].tasks
              if isinstance(t, MappedOperator) or t.get_closest_mapped_task_group() is not None]
    assert all(t.map_index_template for t in mapped), [t.task_id for t in mapped if not t.map_index_template]
    if dag_id in ("pg_partition_convert", "pg_partition_archive", "pg_partition_rotate"):
        assert mapped
