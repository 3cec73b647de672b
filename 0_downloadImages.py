"""Step 0: download the images of a label<TAB>url list into data/<datasetName>/<label>/<n>.jpg.

n is the URL's 1-based position among its label's lines, so a re-run (or a run after a crash) skips the files
already present and fetches only the rest. Bodies that are not images are refused; failures and refused lines
are listed in results/<datasetName>/download_failures.tsv. Exit status 0 even when some URLs failed. A URL whose
body takes over dl_deadlineSec fails; Ctrl-C stops at once, keeping the finished files.

    python 0_downloadImages.py [--urls FILE] [--set NAME=VALUE ...]
"""
from pathlib import Path

import helpers


def add_arguments(parser):
    parser.add_argument("--urls", type=Path, help="label<TAB>url file (default: PARAMETERS imgUrlsPath)")


def main(args, P):
    from image_similarity.data.download import download_images, read_url_list, save_failures
    urls_path = args.urls or P.imgUrlsPath
    if not urls_path.is_file():
        raise helpers.UsageError(f"{urls_path}: URL list not found")
    entries, rejected = read_url_list(urls_path)
    for failure in rejected:
        print(f"refused {failure.reason}")
    if not entries:
        raise helpers.UsageError(f"{urls_path}: no usable label<TAB>url line ({len(rejected)} refused)")

    print(f"Downloading {len(entries)} URL(s) from {urls_path} into {P.imgDir} ({P.dl_nrWorkers} workers)")
    report = download_images(entries, P.imgDir, n_workers=P.dl_nrWorkers, timeout=P.dl_timeoutSec,
                             max_retries=P.dl_maxRetries, max_bytes=P.dl_maxBytes, backoff=P.dl_backoffSec,
                             deadline=P.dl_deadlineSec, max_pixels=P.dl_maxImagePixels)
    for failure in report.failed[:10]:
        print(f"failed {failure.label}\t{failure.url}: {failure.reason}")
    report.failed = rejected + report.failed  # refused lines count as failures in the summary and the TSV

    save_failures(P.downloadFailuresPath, report.failed)
    print(f"Wrote {len(report.downloaded)} new image(s) under {P.imgDir}")
    print(f"Wrote {P.downloadFailuresPath} ({len(report.failed)} failure(s))")
    print(report.summary())


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
