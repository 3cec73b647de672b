"""The near-duplicate command line, ``python -m image_similarity.apps.dedup FOLDER ...`` (:mod:`.dedup`).

Every argument is checked before any image is read: a bad one is refused in one line (exit status 2), and a write
that fails (a full disk) ends the run in one line naming the file (exit status 1).
"""
import argparse
import logging
from pathlib import Path

from ..data.images import SkippedImages, image_key, list_images
from . import dedup
from .dedup_encode import DEFAULT_MODEL, DEFAULT_THRESHOLDS, HASH_SIZES, METHODS, check_settings, load_encodings
from .dedup_move import JOURNAL_NAME, check_destination

__all__ = ["main"]

PRINTED_GROUPS = 20        # groups the command line prints (all are in the CSV)


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m image_similarity.apps.dedup",
        description="Find groups of near-duplicate images in a folder; write them as CSV and a contact sheet, and "
                    "optionally move the duplicates away (never deleting them).")
    parser.add_argument("folder", type=Path, help="folder searched recursively for images")
    parser.add_argument("--method", choices=METHODS, default="dhash", help="how images are compared (default dhash)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="largest distance of a near-duplicate: Hamming bits for hashes, cosine distance for "
                             "cnn (default: " + ", ".join(f"{m} {t}" for m, t in DEFAULT_THRESHOLDS.items()) + ")")
    parser.add_argument("--max-distance", type=int, dest="threshold", help=argparse.SUPPRESS)  # the old name
    parser.add_argument("--hash-size", type=int, default=16,
                        help=f"hash grid side in {HASH_SIZES.start}..{HASH_SIZES.stop - 1}; hash_size**2 bits "
                             "(default 16)")
    parser.add_argument("--invariant", action="store_true",
                        help="also match flipped and quarter-turned copies (8x the encoding work)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"backbone or checkpoint for cnn ({DEFAULT_MODEL})")
    parser.add_argument("--against", type=Path, metavar="ENCODINGS",
                        help="an encodings .npy written by an earlier run: new images are checked against it")
    parser.add_argument("--out", type=Path, help="groups CSV (default: FOLDER_near_duplicates_METHOD.csv beside "
                                                 "FOLDER); the contact sheet .png and .encodings.npy go beside it")
    parser.add_argument("--move-duplicates", type=Path, metavar="DIR",
                        help="move every duplicate to DIR/<key> (journal DIR/moved.tsv; re-run after a kill)")
    return parser


def _checked_against(parser, args, out):
    """The ``--against`` encodings, or None; a one-line parser error when they are unreadable or made differently."""
    if args.against is None:
        return None
    if not args.against.is_file():
        parser.error(f"--against {args.against} not found")
    if out.with_suffix(".encodings.npy").resolve() == args.against.resolve():
        parser.error(f"--out {out} would overwrite the encodings given to --against; choose another --out")
    try:
        against = load_encodings(args.against)
    except (OSError, ValueError, KeyError) as err:
        parser.error(f"--against {args.against} is not an encodings file written by this command ({err})")
    wanted = {"method": args.method, "hash_size": None if args.method == "cnn" else args.hash_size}
    if args.method == "cnn":
        from ..models.backbones import model_id
        wanted["model_id"] = model_id(args.model)
    differs = {k: (v, against.meta.get(k)) for k, v in wanted.items() if v != against.meta.get(k)}
    if differs:
        parser.error(f"--against {args.against} was encoded differently: " + ", ".join(
            f"{k} {new!r} here, {old!r} there" for k, (new, old) in differs.items()))
    return against


def main(argv=None):
    """Parse ``argv`` (default: the command line), check every argument, then find, report and move duplicates."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    try:
        check_settings(args.method, args.hash_size, args.threshold)
    except ValueError as err:
        parser.error(str(err))
    if args.move_duplicates is not None:
        try:
            check_destination(args.folder, args.move_duplicates)
        except ValueError as err:
            parser.error(f"--move-duplicates {err}")
    out = args.out or args.folder.resolve().parent / f"{args.folder.resolve().name}_near_duplicates_{args.method}.csv"
    against = _checked_against(parser, args, out)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        _run(args, out, against)
    except OSError as err:  # a full disk or a vanished folder: one line naming the file
        parser.exit(1, f"error: {err}\n")


def _run(args, out, against):
    """Encode, group, report (CSV, contact sheet, printed groups) and move, as the checked ``args`` say."""
    from ..pipeline.plots import plot_duplicate_groups
    encodings_path = out.with_suffix(".encodings.npy")
    skipped = SkippedImages()
    paths = list_images(args.folder, skipped=skipped)
    if against is not None and against.meta.get("root") == str(args.folder.resolve()):
        known = set(against.keys)    # the same folder encoded before: only its new images are encoded
        paths = [p for p in paths if image_key(p, args.folder) not in known]
    threshold = args.threshold if args.method == "cnn" or args.threshold is None else int(args.threshold)
    encodings = dedup.encode(paths, root=args.folder, path=encodings_path, method=args.method,
                             hash_size=args.hash_size, invariant=args.invariant, model=args.model, skipped=skipped)
    groups = dedup.find_duplicates(encodings, threshold, against)
    dedup.save_groups_csv(out, groups)
    sheet = plot_duplicate_groups(groups, args.folder, out.with_suffix(".png"))
    for number, group in enumerate(groups[:PRINTED_GROUPS], 1):
        print(f"group {number}: {group[0][0]} (kept), " + ", ".join(key for key, _ in group[1:]))
    if len(groups) > PRINTED_GROUPS:
        print(f"... {len(groups) - PRINTED_GROUPS} more group(s) in {out}")
    n_duplicates = sum(len(group) - 1 for group in groups)
    print(f"{len(groups)} group(s) of near-duplicates in {len(encodings)} image(s) under {args.folder}"
          + (f" checked against {len(against)} in {args.against}" if against is not None else "")
          + f"; {n_duplicates} would be removed")
    print(f"wrote {out}, {sheet} and {encodings_path}")
    if args.move_duplicates is not None:
        moved = dedup.move_duplicates(groups, args.folder, args.move_duplicates)
        print(f"moved {len(moved)} duplicate(s) to {args.move_duplicates} (log: "
              f"{args.move_duplicates / JOURNAL_NAME})")
    if skipped:
        print(skipped.summary())

