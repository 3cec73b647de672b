"""Embed every image in a folder (anywhere on disk) into one .npz, incrementally.

The .npz holds ``keys`` (paths relative to DIR, forward slashes), ``features`` (float32, N x D), ``model_id``,
``backbone`` and ``stamps`` (size in bytes and modification time in ns per key). Run it again after adding, changing
or deleting images: only new or changed files are embedded, deleted ones are dropped, and a different model
recomputes everything. The model defaults to the refined proc/<datasetName>/model.pt when rf_maxEpochs > 0 and it
exists, else the pretrained rf_backbone. Unreadable files are listed in <out>_skipped.tsv beside the output.
"""
import logging
import zipfile
from pathlib import Path

import numpy as np

import helpers
from image_similarity import backbones, features, fileio, images

logger = logging.getLogger("A2_featurizeImagesInDir")


def add_arguments(parser):
    parser.add_argument("dir", type=Path, help="folder of images")
    parser.add_argument("--recursive", action="store_true", help="include sub-folders")
    parser.add_argument("--model", help="backbone name or refined checkpoint path (default: see above)")
    parser.add_argument("--out", type=Path, required=True, help="output .npz file")


def main(args, P):
    if not args.dir.is_dir():
        raise helpers.UsageError(f"{args.dir} is not a folder")
    model = args.model or (P.modelPath if P.rf_maxEpochs > 0 and P.modelPath.exists() else P.rf_backbone)
    model_id = backbones.model_id(model)
    skipped = images.SkippedImages()
    paths = images.list_images(args.dir, recursive=args.recursive, skipped=skipped)
    if not paths:
        raise helpers.UsageError(f"no images in {args.dir}" + ("" if args.recursive else " (try --recursive)"))
    keys = [images.image_key(p, args.dir) for p in paths]
    stamps = {k: (p.stat().st_size, p.stat().st_mtime_ns) for k, p in zip(keys, paths)}
    old, new_keys = {}, []
    if args.out.exists():
        try:
            with np.load(args.out, allow_pickle=False) as npz:
                previous = {name: npz[name] for name in ("keys", "features", "model_id", "backbone", "stamps")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise helpers.UsageError(f"{args.out}: not an .npz written by this script ({err}); delete it or pick "
                                     "another --out") from None
        if str(previous["model_id"]) == model_id:
            old = {k: (tuple(s), row) for k, s, row in
                   zip(previous["keys"].tolist(), previous["stamps"], previous["features"])}
            backbone, dim = str(previous["backbone"]), previous["features"].shape[1]
        else:
            print(f"{args.out} was made with {previous['model_id']}, not {model_id}: recomputing all")
    todo = [k for k in keys if k not in old or old[k][0] != stamps[k]]
    print(f"{len(keys)} images under {args.dir}: {len(keys) - len(todo)} unchanged, {len(todo)} to embed "
          f"with {model_id}")
    rows = {k: old[k][1] for k in keys if k in old and old[k][0] == stamps[k]}
    if todo:
        embedder = backbones.load_embedder(model)
        backbone, dim = embedder[2]["backbone"], embedder[2]["dim"]
        path_of = dict(zip(keys, paths))
        new_keys, new_rows = features.featurize([path_of[k] for k in todo], args.dir, embedder, P.run_mbSize,
                                                P.run_nrWorkers, skipped)
        rows.update(zip(new_keys, new_rows))
    kept = [k for k in keys if k in rows]
    matrix = np.array([rows[k] for k in kept], np.float32).reshape(len(kept), dim)
    with fileio.atomic_path(args.out) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, keys=np.array(kept, dtype=str), features=matrix, model_id=np.array(model_id),
                 backbone=np.array(backbone), stamps=np.array([stamps[k] for k in kept], np.int64).reshape(-1, 2))
    removed = len(set(old) - set(keys))
    print(f"Wrote {args.out}: {len(kept)} x {dim} float32")
    if skipped:
        skipped.save(args.out.with_name(args.out.stem + "_skipped.tsv"))
        logger.warning(skipped.summary())
    print(f"Done: embedded {len(new_keys)}, reused {len(kept) - len(new_keys)}, dropped {removed} removed, "
          f"skipped {len(skipped)}.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
