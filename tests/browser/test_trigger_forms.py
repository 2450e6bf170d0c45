"""The Airflow UI as users meet it: a real api-server, scheduler, dag-processor and triggerer (LocalExecutor, SQLite
metadata DB) serving dags/, driven in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, through
Selenium; no browser is downloaded).

Every DAG's Trigger form opens with its defaults and its Trigger button enabled (issue 17: empty non-null params
disabled it on all of them); pg_partition_convert is triggered from its form on a seeded table and must succeed;
a fill task's log page shows the progress line. Screenshots go to ``$PGP_BROWSER_ARTIFACTS`` (default
``tests/browser/artifacts/``, git-ignored).

If Chromium or chromedriver is missing the test FAILS with the install command: CI (.ci/run) installs them.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pg_partition.core.db.catalog import QualifiedName
from tests.conftest import REPO
from tests.support.airflow import Airflow, airflow_home
from tools.seed import seed_activities

# a real scheduler runs ~40 task processes for the conversion: minutes on a busy 2-core CI machine, so this test
# gets more than the suite's 600 s default
pytestmark = [pytest.mark.browser, pytest.mark.timeout(2400)]

CHROMIUM = os.environ.get("PGP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PGP_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("PGP_BROWSER_ARTIFACTS", str(Path(__file__).resolve().parent / "artifacts")))
DAG_IDS = ["pg_partition_convert", "pg_partition_rollback", "pg_partition_advisor", "pg_partition_cost_report",
           "pg_partition_rotate", "pg_partition_archive", "pg_partition_restore"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1500,1100"]


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (Path(p).is_file() and os.access(p, os.X_OK))]
    if missing:
        pytest.fail(f"the browser test needs Debian's Chromium and its driver; missing: {', '.join(missing)}. "
                    "Install them: apt-get install -y chromium chromium-driver (or set PGP_CHROMIUM / "
                    "PGP_CHROMEDRIVER)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)  # selenium-manager is not used: a path is given
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromium and chromedriver


@pytest.fixture
def airflow_ui(airflow_db: Path, db: Any, tmp_path: Path) -> Iterator[tuple[Airflow, str]]:
    """api-server (UI + execution API), scheduler, dag-processor and triggerer over dags/, on free ports. The
    connection ``pg_demo`` (the DAGs' default) points at this test's database, so the forms' defaults work."""
    home, port, env = airflow_home(
        airflow_db, tmp_path, REPO / "dags",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",  # rotate/archive must not start on their own
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW_CONN_PG_DEMO=os.environ[f"AIRFLOW_CONN_{db.conn_id.upper()}"])
    env["AIRFLOW__API__BASE_URL"] = f"http://127.0.0.1:{port}"
    af = Airflow(home, env)
    base = f"http://127.0.0.1:{port}"
    try:
        af.start("api-server", "api-server", "--workers", "1")
        af.start("dag-processor", "dag-processor")
        af.start("scheduler", "scheduler")
        af.start("triggerer", "triggerer")

        def healthy() -> bool:
            af.alive()
            try:
                with urllib.request.urlopen(f"{base}/api/v2/monitor/health", timeout=5) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(healthy, "the api-server to answer", timeout=180)

        def parsed() -> bool:
            af.alive()
            ids = {r[0] for r in af.query("SELECT dag_id FROM dag WHERE is_stale = 0")}
            return set(DAG_IDS) <= ids

        wait_for(parsed, "the dag-processor to parse every DAG of dags/", timeout=240, every=2)
        yield af, base
    finally:
        af.stop()


def shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def open_trigger_form(driver: Any, base: str, dag_id: str) -> Any:
    """The DAG's page, then its Trigger button: returns the form's submit button."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{base}/dags/{dag_id}")
    wait = WebDriverWait(driver, 60)
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=trigger-dag-button]"))).click()
    submit = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=trigger-dag-submit]")))
    time.sleep(1.5)  # the form validates its fields after rendering; the button's state settles then
    return submit


def page_text(driver: Any) -> str:
    """The page's visible text; "" while a starved browser cannot answer (the callers poll until it does)."""
    from selenium.common.exceptions import TimeoutException

    try:
        return str(driver.execute_script("return document.body.innerText"))
    except TimeoutException:
        return ""


def test_every_trigger_form_is_enabled_and_convert_runs_from_its_form(browser, airflow_ui, db, conn) -> None:
    from selenium.webdriver.common.by import By

    af, base = airflow_ui
    seed_activities(conn, QualifiedName("public", "activities"), rows=30_000, timestamptz=True)

    for dag_id in DAG_IDS:
        submit = open_trigger_form(browser, base, dag_id)
        first_section = browser.find_elements(By.XPATH, "//*[normalize-space(text())='What to convert' or "
                                              "normalize-space(text())='What to act on']")
        if first_section:  # open the first section so the screenshot shows fields, descriptions, examples
            first_section[0].click()
            time.sleep(1)
        shot(browser, f"trigger-form-{dag_id}")
        assert submit.is_enabled(), f"{dag_id}: the Trigger button is disabled with the defaults:\n" + \
            page_text(browser)[-3000:]
        # the sections of the form are the params' sections
        if dag_id == "pg_partition_convert":
            text = page_text(browser)
            for section in ("What to convert", "How fast", "Safety", "Change capture", "Replication lag",
                            "Advanced"):
                assert section in text, f"section {section!r} missing from the convert form"

    # trigger the conversion from its form, with the defaults (pg_demo, public.activities, created_at, month);
    # the DAG is paused (as at creation in most deployments): the form's "Unpause on trigger" box is checked
    submit = open_trigger_form(browser, base, "pg_partition_convert")
    unpause = browser.find_elements(By.XPATH, "//label[contains(normalize-space(.), 'Unpause pg_partition_convert "
                                    "on trigger')]//input[@type='checkbox']")
    assert unpause and unpause[0].is_selected(), "the form should offer to unpause the DAG, checked"
    assert submit.is_enabled()
    # the metadata DB was copied from the session's, which holds dag.test() runs of other tests in this worker:
    # only the run the form creates counts
    earlier = {r[0] for r in af.query("SELECT run_id FROM dag_run WHERE dag_id = 'pg_partition_convert'")}
    submit.click()

    def run() -> tuple[str, str] | None:
        af.alive()
        rows = [r for r in af.query("SELECT run_id, state FROM dag_run WHERE dag_id = 'pg_partition_convert'")
                if r[0] not in earlier]
        assert len(rows) <= 1, f"the form created more than one run: {rows}"
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    run_id, _ = wait_for(run, "the DAG run the form created", timeout=60)
    wait_for(lambda: (run() or ("", ""))[1] in {"success", "failed"}, "the convert run to finish", timeout=900,
             every=3)
    states = af.query("SELECT task_id, map_index, state FROM task_instance WHERE dag_id = 'pg_partition_convert' "
                      "AND run_id = ?", run_id)
    assert run() == (run_id, "success"), states
    with db.connect() as check:
        assert check.execute("SELECT count(*) FROM public.activities").fetchone() == (30_000,)
        partitioned = check.execute("SELECT relkind FROM pg_class WHERE oid = 'public.activities'::regclass")
        assert partitioned.fetchone() == ("p",)

    # the run's grid: every task green; the mapped fills are labelled by the partitions they cover (30,000 rows:
    # one fill task for all of them)
    browser.get(f"{base}/dags/pg_partition_convert/runs/{run_id}")
    wait_for(lambda: "success" in page_text(browser).lower(), "the run page", timeout=60)
    time.sleep(2)
    shot(browser, "convert-run-success")
    labels = {str(r[0]) for r in af.query(
        "SELECT rendered_map_index FROM task_instance WHERE dag_id = 'pg_partition_convert' AND task_id = 'fill' "
        "AND run_id = ?", run_id)}
    assert len(labels) == 1 and all(label.startswith("public.activities_") and " .. public.activities_" in label
                                    and label.endswith(" partitions)") for label in labels), labels

    # a fill task's log page shows the progress line (rows, rows/s)
    map_index = af.query("SELECT map_index FROM task_instance WHERE dag_id = 'pg_partition_convert' "
                         "AND task_id = 'fill' AND run_id = ? ORDER BY map_index LIMIT 1", run_id)[0][0]
    browser.get(f"{base}/dags/pg_partition_convert/runs/{run_id}/tasks/fill/mapped/{map_index}")
    wait_for(lambda: "rows/s" in page_text(browser), "the progress line in the fill task's log", timeout=90)
    progress = [line for line in page_text(browser).splitlines() if "rows/s" in line]
    assert any("fill public.activities_" in line and "batches" in line for line in progress), progress
    assert any("overall fill:" in line and "partitions done" in line for line in progress), progress
    logs = browser.find_elements(By.XPATH, "//*[contains(text(), 'rows/s')]")
    if logs:
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", logs[0])
    shot(browser, "convert-fill-task-log")
