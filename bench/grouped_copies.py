"""Grouped data for instance retrieval: every image of SRC and K transformed copies of it, in its label's folder.

The copies are bench/copy_detection.py's (seeded by the image's key); DST/groups.tsv maps each file to its group, the
original's key, for ``--set groupsFile=groups.tsv`` (step 1 keeps a group on one side of the split, step 5 reports
instance recall@1, recall@5 and mAP). Run the pipeline on it with ``--set dedup_enabled=False`` (the copies are
near-duplicates on purpose).

    python bench/grouped_copies.py data/fridgeObjects /tmp/run/data/fridgeCopies --copies 2
"""
import argparse
import sys
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from copy_detection import transformed_copy  # noqa: E402
from image_similarity.data import fileio  # noqa: E402
from image_similarity.data.images import list_images, read_image  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="folder of label sub-folders, e.g. data/fridgeObjects")
    parser.add_argument("dst", type=Path, help="new folder: DST/<label>/<stem>.jpg, <stem>_copy<n>.jpg, groups.tsv")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for path in list_images(args.src):
        key = path.relative_to(args.src).as_posix()
        label, stem = key.split("/")[0], Path(key).stem
        image = read_image(path)
        (args.dst / label).mkdir(parents=True, exist_ok=True)
        image.save(args.dst / label / f"{stem}.jpg", "JPEG", quality=95)
        rows.append((f"{label}/{stem}.jpg", key))
        rng = np.random.default_rng([args.seed, zlib.crc32(key.encode("utf-8"))])
        for n in range(args.copies):
            transformed_copy(image, rng).save(args.dst / label / f"{stem}_copy{n}.jpg", "JPEG", quality=95)
            rows.append((f"{label}/{stem}_copy{n}.jpg", key))
    fileio.atomic_write_text(args.dst / "groups.tsv", "".join(f"{path}\t{group}\n" for path, group in rows))
    print(f"Wrote {len(rows)} images in {len(rows) // (args.copies + 1)} groups and {args.dst / 'groups.tsv'}")


if __name__ == "__main__":
    main()
