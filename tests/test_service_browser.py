"""The service's page in a real headless Chromium (Selenium): pick an image, see the grid of matches, screenshot it."""
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_image
from image_similarity.search.rankers import ranker_names
from test_service import pipeline, server  # noqa: F401  (module-scoped fixtures: the pipeline and the live server)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1200, 900)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through its chromedriver, with a fresh profile; skips when either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.is_file():
            reason = f"{binary} is missing: apt-get install chromium chromium-driver to run the browser test"
            print(reason)
            pytest.skip(reason)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_shows_k_matches(browser, server, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    client, _ = server
    browser.get(str(client.base_url))
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "ranker")).options) == len(ranker_names()))  # from /health
    assert Select(browser.find_element(By.ID, "ranker")).first_selected_option.text == "hybrid"  # it has a classifier
    Select(browser.find_element(By.ID, "k")).select_by_value("10")
    query = make_image(tmp_path / "query.png", (205, 25, 35), size=(120, 90), pattern="stripes")
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .match")) == 10)
    matches = browser.find_elements(By.CSS_SELECTOR, "#results .match")
    captions = [m.find_element(By.TAG_NAME, "figcaption").text for m in matches]
    # The file's name, its label, and a distance with four significant digits (never "0.0000" for a small one).
    found = re.fullmatch(r"1\. red_\d+\.jpg \(red\) - distance (-?[\d.]+)(e[-+]\d+)?", captions[0])
    assert found and len(found.group(1).lstrip("-").replace(".", "").lstrip("0")) == 4, captions[0]
    assert "10 matches (hybrid)" in browser.find_element(By.ID, "status").text
    # Every thumbnail came from /images/<id>?thumb=1 and decoded in the browser.
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                             for img in d.find_elements(By.CSS_SELECTOR, "#results img")))
    shot = tmp_path / "service_page.png"
    assert browser.save_screenshot(str(shot))
    repo_copy = REPO / "results" / "service_page.png"
    repo_copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, repo_copy)
    with Image.open(shot) as img:
        viewport = browser.execute_script("return [innerWidth * devicePixelRatio, innerHeight * devicePixelRatio]")
        assert img.format == "PNG" and img.size == tuple(viewport) and img.width == WINDOW[0]
        assert img.convert("L").getextrema()[0] < 200  # not a blank page
    assert shot.stat().st_size > 10_000


def test_page_shows_the_reason_for_a_bad_file(browser, server, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client, _ = server
    browser.get(str(client.base_url))
    bad = tmp_path / "notes.jpg"
    bad.write_text("not pixels\n")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 30).until(lambda d: status.text.startswith("Error"))
    assert "Error 415: notes.jpg: not an image" in status.text
    assert browser.find_elements(By.CSS_SELECTOR, "#results .match") == []


def test_page_refuses_an_oversize_file_before_sending_it(browser, server, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client, P = server
    browser.get(str(client.base_url))
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return maxUploadBytes") == P.svc_maxUploadBytes)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (P.svc_maxUploadBytes + 1))
    browser.find_element(By.ID, "file").send_keys(str(big))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 30).until(lambda d: status.text.startswith("Not sent"))
    assert f"big.jpg is {P.svc_maxUploadBytes + 1:,} bytes, over the service's {P.svc_maxUploadBytes:,}" in status.text


def test_page_combines_attributes(browser, server, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client, _ = server
    browser.get(str(client.base_url))
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attributes input")) == 2)
    for name in ("tiny", "again"):
        browser.find_element(By.ID, f"attr-{name}").click()
    query = make_image(tmp_path / "query.png", (30, 40, 205), size=(120, 90))
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .match")) == 5)
    assert "(attributes:tiny+again)" in browser.find_element(By.ID, "status").text
    captions = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#results figcaption")]
    assert all(", P(match) " in c for c in captions) and re.match(r"1\. blue_\d+\.jpg \(blue\) - distance ", captions[0])


def test_page_shows_the_label_issue_suspects(browser, server):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from test_service import write_label_issues

    client, P = server
    write_label_issues(P.labelIssuesPath)
    try:
        browser.get(str(client.base_url))
        browser.find_element(By.CSS_SELECTOR, "#issues-view summary").click()
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#issues .suspect")) == 2)
        captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#issues figcaption")]
        assert captions[0] == "1. red/red_3.jpg (train): given red (p 0.03), suggested blue"
        wait.until(lambda d: d.execute_script("const i = document.querySelector('#issues img'); "
                                              "return i.complete && i.naturalWidth > 0"))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#issues img")) == 1  # gone/x.jpg has no image
    finally:
        P.labelIssuesPath.unlink()


def test_map_view_draws_the_references_and_queries_a_clicked_one(browser, server):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    from test_service import write_map

    client, P = server
    emap = write_map(P)  # row 3 is a suspect, rows 0 and 1 near-duplicates
    try:
        browser.get(str(client.base_url))
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "ranker")).options) == len(ranker_names()))
        Select(browser.find_element(By.ID, "ranker")).select_by_value("cosine")
        browser.find_element(By.CSS_SELECTOR, "#map-view summary").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#map circle.point")) == 36)
        points = browser.find_elements(By.CSS_SELECTOR, "#map circle.point")
        assert [int(p.get_attribute("data-id")) for p in points] == list(range(36))
        assert len({p.get_attribute("fill") for p in points}) == 3  # one colour per label
        rings = browser.find_elements(By.CSS_SELECTOR, "#map circle.ring")
        assert len(rings) == 1 and rings[0].get_attribute("cx") == points[3].get_attribute("cx")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#map line")) == 1
        assert "36 references mapped with tsne (1 label issues" in browser.find_element(By.ID, "map-status").text
        # The point farthest from its neighbours, so that the pointer lands on it and on no other.
        coords = emap.coords.astype(float)
        gaps = np.linalg.norm(coords[:, None] - coords[None], axis=-1) + np.eye(len(coords)) * 9
        row = int(gaps.min(axis=1).argmax())
        ActionChains(browser).move_to_element(points[row]).perform()
        tip = browser.find_element(By.ID, "map-tip")
        wait.until(lambda d: tip.is_displayed() and tip.text == emap.keys[row])
        wait.until(lambda d: d.execute_script("const i = document.querySelector('#map-tip img'); "
                                              "return i.complete && i.naturalWidth > 0"))
        points[row].click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .match")) == 5)
        first = browser.find_element(By.CSS_SELECTOR, "#results figcaption").text
        found = re.fullmatch(r"1\. (\S+) \((\w+)\) - distance (\S+)", first)
        assert found and found.group(1) == emap.keys[row].split("/")[-1], first
        assert found.group(2) == emap.labels[row] and abs(float(found.group(3))) < 1e-4, first
        assert "5 matches (cosine)" in browser.find_element(By.ID, "status").text
    finally:
        P.embeddingMapPath.unlink(missing_ok=True)
