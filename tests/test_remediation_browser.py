"""The crew and operator pages in headless Chromium (selenium) against a real uvicorn server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from remediation_support import T0, TOKENS, alert, service_config
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from servers import Mosquitto, free_port

from meshwatch.registry import Device, DeviceKind, Registry
from remediation.command import Service
from remediation.store import Incoming


def state_is(browser: webdriver.Chrome, state: str) -> None:
    """Wait for the page after a click: its state line says ``state``."""
    WebDriverWait(browser, 10, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda b: b.find_element(By.ID, "state").text == state)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    driver_path = shutil.which("chromedriver")
    assert driver_path, "install the Debian packages chromium and chromium-driver (make servers)"
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=412,915"):  # a phone
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(service=DriverService(driver_path), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def test_crew_acknowledges_starts_and_resolves(tmp_path: Path, mosquitto: Mosquitto,
                                               browser: webdriver.Chrome) -> None:
    config = service_config(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", mosquitto.url,
                            free_port())
    service = Service(config)
    service.store.registry = Registry([Device(
        device_id="mtr-1", device_kind=DeviceKind.CUSTOMER_METER, site="dma-01",
        district="dma-01", gateway_id="gw-1", cadence_s=900, lat=52.09, lon=5.12)])
    service.start()
    try:
        service.store.ingest([Incoming(alert=alert(
            "a-1", device_id="mtr-1", severity="major",
            evidence={"flow_lpm": [0.5, 0.6, 3.9, 4.1, 4.0]})),
            Incoming(alert=alert("b-1", district="dma-02", device_id="mtr-9", ts=T0))])
        base = f"http://127.0.0.1:{config.remediation.http_port}"
        browser.get(base + "/ui/crew")
        assert "/ui/login" in browser.current_url
        browser.find_element(By.ID, "token").send_keys(TOKENS["crew-a"])
        browser.find_element(By.ID, "login").click()
        WebDriverWait(browser, 10).until(lambda b: "/ui/crew" in b.current_url)
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.wo")
        assert len(rows) == 1, "crew-a sees only its own work order"
        wid = rows[0].get_attribute("data-id")
        rows[0].find_element(By.TAG_NAME, "a").click()
        state_is(browser, "assigned")
        assert browser.find_elements(By.CSS_SELECTOR, "svg.spark polyline")
        assert "mlat=52.09000" in browser.find_element(By.ID, "map").get_attribute("href")

        browser.find_element(By.ID, "do-acknowledged").click()
        state_is(browser, "acknowledged")
        assert service.store.work_order(wid)["state"] == "acknowledged"
        browser.find_element(By.ID, "do-in_progress").click()
        state_is(browser, "in_progress")
        Select(browser.find_element(By.ID, "outcome")).select_by_value("confirmed_leak")
        browser.find_element(By.ID, "note").send_keys("service pipe joint replaced")
        browser.find_element(By.ID, "do-resolved").click()
        state_is(browser, "resolved")
        stored = service.store.work_order(wid)
        assert (stored["state"], stored["outcome"], stored["note"]) == (
            "resolved", "confirmed_leak", "service pipe joint replaced")
        assert [t["actor"] for t in stored["audit"]][-3:] == ["crew:crew-a"] * 3

        other = service.store.list_work_orders(crew_id="crew-b")[1][0]["work_order_id"]
        browser.get(f"{base}/ui/work-orders/{other}")
        assert "No such work order" in browser.page_source

        browser.find_element(By.ID, "logout").click()
        WebDriverWait(browser, 10).until(lambda b: "/ui/login" in b.current_url)
        browser.find_element(By.ID, "token").send_keys(TOKENS["operator"])
        browser.find_element(By.ID, "login").click()
        WebDriverWait(browser, 10).until(lambda b: "/ui/operator" in b.current_url)
        assert len(browser.find_elements(By.CSS_SELECTOR, "tr.incident")) == 1
        kpis = browser.find_element(By.ID, "kpis").text
        assert "Remediation rate\n50 %" in kpis
    finally:
        service.stop()
