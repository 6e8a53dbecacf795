"""The MLflow UI, started by `sslray ui` on a store written by real tiny sslray runs, driven by headless
Chromium: the experiment page lists the run by its readable name, and the run page shows its kNN and
probe metrics with the values MLflow holds. A screenshot is saved under the test's tmp dir."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest_plugins = ["conftest_runs"]
pytestmark = [pytest.mark.browser, pytest.mark.ray, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHOWN = ("knn_top1", "probe_knn_top1", "probe_linear_top1", "probe_linear_macro_f1")


@pytest.fixture(scope="session")
def chromium() -> tuple[Path, Path]:
    """Debian's chromium + chromium-driver, installed with apt-get when missing."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if shutil.which("apt-get") is None:
            pytest.skip("no /usr/bin/chromium and no apt-get to install Debian's chromium + chromium-driver")
        sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
        if sudo is None:
            pytest.skip("installing chromium needs root (or sudo): apt-get install chromium chromium-driver")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
            p = subprocess.run(sudo + cmd, env=env, capture_output=True, text=True, timeout=1200, check=False)
            assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return CHROMIUM, CHROMEDRIVER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    """Poll until the server answers 200; fail at once (with its log) if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`sslray ui` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"MLflow UI did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_ui(tiny_runs, tmp_path_factory):
    """`sslray ui` on the tiny runs' store, on a free loopback port; yields the experiment link it prints.
    Stopped (its process group) after."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sslray.cli", "ui", "--tracking-uri", tiny_runs.uri,
                                 "--host", "127.0.0.1", "--port", str(port), "--experiment", tiny_runs.experiment],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/health", proc, log)
        printed = re.search(r"at (http://\S+)", log.read_text())  # the link `sslray ui` prints
        assert printed, log.read_text()
        yield printed.group(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture()
def browser(chromium, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium[0])
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1600,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(chromium[1])), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _shown(v: float) -> str:
    """How the UI writes a metric value: JavaScript's shortest round-trip form (2.0 -> '2')."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def test_ui_shows_the_run_and_its_knn_and_probe_metrics(tiny_runs, mlflow_ui, browser, tmp_path):
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    c = MlflowClient(tiny_runs.uri)
    exp = c.get_experiment_by_name(tiny_runs.experiment)
    run = c.search_runs([exp.experiment_id], f"tags.`sslray.method` = '{tiny_runs.methods[0]}'")[0]
    name, metrics = run.info.run_name, run.data.metrics
    wait = WebDriverWait(browser, 120, poll_frequency=0.5)

    # The link `sslray ui --experiment` prints opens the experiment's runs, listed by readable name.
    assert mlflow_ui.endswith(f"/#/experiments/{exp.experiment_id}/runs")
    browser.get(mlflow_ui)
    link = wait.until(EC.visibility_of_element_located((By.XPATH, f"//a[normalize-space()='{name}']")))
    assert tiny_runs.experiment in browser.page_source
    for other in c.search_runs([exp.experiment_id]):
        assert other.info.run_name in browser.page_source  # every run of the experiment is listed

    # Its page shows the kNN and probe metrics with MLflow's values.
    link.click()
    wait.until(EC.visibility_of_element_located((By.XPATH, "//input[@placeholder='Search metrics']")))

    def row(key):
        return wait.until(EC.visibility_of_element_located(
            (By.XPATH, f"//div[@role='row'][.//a[normalize-space()='{key}']]")))

    for key in SHOWN:
        cells = row(key).find_elements(By.XPATH, ".//div[@role='cell']")
        assert [x.text for x in cells] == [key, _shown(metrics[key])], key

    # Narrow the table to the probe metrics, so the screenshot shows them; the filter is live.
    search = browser.find_element(By.XPATH, "//input[@placeholder='Search metrics']")
    search.send_keys("probe_", Keys.ENTER)
    wait.until(EC.invisibility_of_element_located((By.XPATH, "//div[@role='row'][.//a[normalize-space()='loss']]")))
    for key in SHOWN[1:]:
        assert row(key).is_displayed()
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", row("probe_linear_top1"))
    shot = tmp_path / "mlflow_run_page.png"
    assert browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 20_000
