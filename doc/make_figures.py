"""Make the README's figures and console excerpts from one real run on the bundled sample.

Copies data/fridgeObjects/ (never the ../shared images) into a scratch workDir and runs there, with PARAMETERS.py's
defaults and seed: run_pipeline.py (steps 1-5), A1_imageRetrieval.py on one test image, and A4_webService.py for a
screenshot of its page in headless Chromium (/usr/bin/chromium and /usr/bin/chromedriver, through Selenium). Writes

  doc/figures/*.png        the split table, refine curves, SVM calibration, top-N curves, two per-query figures
                           (a hit and, when there is one, a miss), the A1 grid and the web page
  doc/console/<step>.txt   each step's console output, progress-bar redraws removed, paths relative to the workDir

and removes older PNG/TXT files there that this run did not write. The PNGs carry no timestamp (matplotlib's only
metadata is its version), so a second run gives the same files up to training noise. A few minutes on 2 CPU cores:

  nice -n 19 .venv/bin/python doc/make_figures.py
"""
import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # helpers.py and the package live at the repository root

import helpers  # noqa: E402
from image_similarity.data import fileio
from image_similarity.pipeline import plots  # noqa: E402

SAMPLE = REPO / "data" / "fridgeObjects"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WINDOW = (1000, 1000)  # browser window in pixels (the screenshot is its viewport)
STEP_HEADER = re.compile(r"^=== \[\d+/\d+\] (\S+)\.py ===$", re.M)


def add_arguments(parser):
    parser.add_argument("--out", type=Path, default=REPO / "doc", help="folder for figures/ and console/ "
                                                                      "(default: doc/)")
    parser.add_argument("--work", type=Path, help="scratch workDir, kept afterwards (default: a temporary folder, "
                                                  "removed)")
    parser.add_argument("--query", default="milk_bottle/milk_bottle_75.jpg",
                        help="image of the sample, relative to data/fridgeObjects/, for A1 and the web page "
                             "(default: a test image, milk_bottle/milk_bottle_75.jpg)")


def clean_console(text, work):
    """Console text as a reader would see it: the last state of each progress bar, paths relative to the workDir.

    Parameters
    ----------
    text : str
        Merged stdout and stderr, with tqdm's carriage-return redraws.
    work : Path
        The workDir: ``<work>/`` and the repository's ``<repo>/`` prefixes are removed from paths.
    """
    lines = []
    for line in text.split("\n"):
        shown = line.split("\r")[-1].rstrip()  # what remains on screen after the redraws
        if shown or "\r" not in line:
            lines.append(shown)
    return "\n".join(lines).replace(f"{work}/", "").replace(f"{REPO}/", "").strip("\n") + "\n"


def run_logged(script, *args, env):
    """Run a script of the repository in the foreground; its merged output, or SystemExit naming the failure."""
    # Bytes, not text=True: text mode would turn the progress bars' carriage returns into line breaks.
    result = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = result.stdout.decode("utf-8", errors="replace")
    if result.returncode != 0:
        raise SystemExit(f"{script} failed with exit status {result.returncode}:\n{output[-3000:]}")
    return output


def split_table(P, path):
    """split_counts.csv as a PNG table with a row of totals."""
    with open(P.splitCountsPath, encoding="utf-8", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    totals = ["all", *(sum(int(row[i]) for row in rows) for i in range(1, len(header)))]
    return plots.plot_table(header, [*rows, totals], path, title=f"Images per label and split ({P.datasetName})",
                            bold_last_row=True)


def pick_visualizations(folder):
    """The first per-query figure whose closest match is the positive (green) and the first that misses (red)."""
    from PIL import Image

    def green(path):
        with Image.open(path) as img:
            r, g, b = img.convert("RGB").getpixel((0, 0))
        return g > r

    figures = sorted(folder.glob("*.png"))
    hits = [f for f in figures if green(f)]
    misses = [f for f in figures if not green(f)]
    return (hits[:1] + misses[:1]) if hits and misses else figures[:2]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def screenshot_page(P, query, path, env, log_path):
    """Start A4_webService.py on the workDir, upload ``query`` in headless Chromium, save the page as a PNG."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    with open(log_path, "w", encoding="utf-8") as log:
        server = subprocess.Popen([sys.executable, str(REPO / "A4_webService.py"), "--port", str(port),
                                   "--set", f"workDir={P.rootDir}"], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise SystemExit(f"A4_webService.py exited with status {server.returncode}:\n"
                                 f"{Path(log_path).read_text(encoding='utf-8')[-3000:]}")
            try:
                urllib.request.urlopen(url + "health", timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("A4_webService.py did not answer /health within 10 minutes") from None
                time.sleep(1)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
        driver.get(url)
        wait = WebDriverWait(driver, 300)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "ranker")).options) > 0)  # filled from /health
        Select(driver.find_element(By.ID, "k")).select_by_value("10")
        driver.find_element(By.ID, "file").send_keys(str(query))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .match")) == 10)
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                                 for i in d.find_elements(By.CSS_SELECTOR, "#query img, #results img")))
        fileio.atomic_write_bytes(path, driver.get_screenshot_as_png())
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        server.send_signal(signal.SIGINT)  # as Ctrl+C: uvicorn shuts down and the script prints its summary
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return path


def main(args, P):
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.is_file():
            raise helpers.UsageError(f"{binary} is missing (apt-get install chromium chromium-driver): "
                                     "the web page screenshot needs it")
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="make_figures-"))
    if (work / "data").exists() or (work / "proc").exists():
        raise helpers.UsageError(f"--work {work} already holds data/ or proc/: give a new folder")
    overrides = [*args.overrides, "datasetName=fridgeObjects", f"workDir={work}"]
    P = helpers.load_parameters(overrides)
    set_args = [arg for text in overrides for arg in ("--set", text)]
    if not (SAMPLE / args.query).is_file():
        raise helpers.UsageError(f"--query {args.query}: no such image under {SAMPLE}")
    figures, console = args.out / "figures", args.out / "console"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0"}
    start = time.perf_counter()
    shutil.copytree(SAMPLE, P.imgDir)
    written = []
    try:
        print(f"Running the pipeline on a copy of {SAMPLE} in {work} ...", flush=True)
        text = clean_console(run_logged("run_pipeline.py", *set_args, env=env), work)
        written.append(fileio.atomic_write_text(console / "run_pipeline.txt", text))
        # [before, step, its output, step, its output, ...]; run_pipeline's own summary line is not step 5's.
        parts = STEP_HEADER.split(re.sub(r"\n\nran \d+ steps .*\n$", "\n", text))
        for step, output in zip(parts[1::2], parts[2::2]):
            written.append(fileio.atomic_write_text(console / f"{step}.txt", output.strip("\n") + "\n"))

        written.append(split_table(P, figures / "split_counts.png"))
        for source in (P.refineCurvesPath, P.svmCurvePath, P.topNPlotPath):
            written.append(fileio.atomic_write_bytes(figures / source.name, source.read_bytes()))
        shown = pick_visualizations(next(P.resultsDir.glob("visualizations_*")))
        for n, source in enumerate(shown, 1):
            written.append(fileio.atomic_write_bytes(figures / f"query_result_{n}.png", source.read_bytes()))

        query = P.imgDir / args.query
        print(f"A1_imageRetrieval.py on {args.query} ...", flush=True)
        text = clean_console(run_logged("A1_imageRetrieval.py", query, "--top", 10, *set_args, env=env), work)
        written.append(fileio.atomic_write_text(console / "A1_imageRetrieval.txt", text))
        grid = P.layout.retrieval_figure(query.stem, re.search(r"\((\S+) on ", text).group(1))
        written.append(fileio.atomic_write_bytes(figures / "retrieval_grid.png", grid.read_bytes()))

        print("A4_webService.py and a headless Chromium ...", flush=True)
        log = work / "A4_webService.log"
        written.append(screenshot_page(P, query, figures / "web_page.png", env, log))
        text = clean_console(log.read_bytes().decode("utf-8", errors="replace"), work)
        written.append(fileio.atomic_write_text(console / "A4_webService.txt", text))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    stale = [p for folder, pattern in ((figures, "*.png"), (console, "*.txt")) for p in folder.glob(pattern)
             if p not in written]
    for path in stale:
        path.unlink()
    for path in written:
        print(f"Wrote {path} ({path.stat().st_size / 1000:.0f} kB)")
    size = sum(p.stat().st_size for p in written if p.suffix == ".png")
    print(f"Done: {sum(p.suffix == '.png' for p in written)} figures ({size / 1e6:.2f} MB) and "
          f"{sum(p.suffix == '.txt' for p in written)} console logs in {args.out}, {len(stale)} stale file(s) "
          f"removed, in {(time.perf_counter() - start) / 60:.1f} min.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
