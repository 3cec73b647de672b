"""Where one pipeline run keeps its artefacts: every path under ``proc/<dataset>/`` and ``results/<dataset>/``.

PARAMETERS.py builds one :class:`RunLayout` from the dataset name, and the scripts, :mod:`.runs` and the apps take
their paths from it, so a file is named in one place. Nothing here reads or writes a file except
:meth:`RunLayout.save_record` / :meth:`RunLayout.load_record` (``run.json``) and the existence checks of
:func:`missing_message`.
"""
import re
from dataclasses import dataclass
from pathlib import Path

from ..data.fileio import load_json, save_json
from ..data.splits import SPLITS

__all__ = ["RunLayout", "missing_message"]


def missing_message(path, step):
    """One line saying why ``path`` is missing and which ``step`` writes it.

    An older version of this project wrote the same artefact as ``<stem>.pickle``; such a file is never read
    (unpickling can run code), and the message says so.
    """
    path = Path(path)
    older = path.with_suffix(".pickle")
    if older != path and older.exists():
        return (f"{path} not found; {older} is a pickle from an older version of this project (never read: "
                f"unpickling can run code): run {step} again")
    return f"{path} not found: run {step} first"


@dataclass(frozen=True)
class RunLayout:
    """Every artefact path of one run.

    Parameters
    ----------
    proc_dir : Path
        Intermediate files, read back by later steps (``proc/<dataset>/``): JSON, CSV, ``.npy``, skops and the
        ``weights_only`` checkpoint, never pickles.
    results_dir : Path
        Tables and figures for people (``results/<dataset>/``).
    """

    proc_dir: Path
    results_dir: Path

    def _per_split(self, pattern):
        return {split: self.proc_dir / pattern.format(split=split, Split=split.title()) for split in SPLITS}

    # Step 1 (1_prepareData.py)
    @property
    def split_keys(self):
        """``{split: imgFilenames<Split>.json}``: ``{label: [keys]}`` (``splits.save_split``)."""
        return self._per_split("imgFilenames{Split}.json")

    @property
    def ranking_sets(self):
        """``{split: imgInfos<Split>.json}``: the ranking sets (``splits.save_ranking_sets``)."""
        return self._per_split("imgInfos{Split}.json")

    @property
    def pairs_csv(self):
        """``{split: pairs_<split>.csv}``: query, reference, is_positive."""
        return self._per_split("pairs_{split}.csv")

    label_to_id = property(lambda self: self.proc_dir / "lutLabel2Id.json")
    id_to_label = property(lambda self: self.proc_dir / "lutId2Label.json")
    dedup_encodings = property(lambda self: self.proc_dir / "dedup_encodings.npy")
    split_counts = property(lambda self: self.results_dir / "split_counts.csv")
    near_duplicates = property(lambda self: self.results_dir / "near_duplicates.csv")
    download_failures = property(lambda self: self.results_dir / "download_failures.tsv")
    skipped_images = property(lambda self: self.results_dir / "skipped_images.tsv")
    # Step 2 (2_refineDNN.py)
    model = property(lambda self: self.proc_dir / "model.pt")
    refine_checkpoint = property(lambda self: self.proc_dir / "refine_checkpoint.pt")
    refine_log = property(lambda self: self.results_dir / "refine_log.csv")
    refine_curves = property(lambda self: self.results_dir / "refine_curves.png")
    # Step 3 (3_featurizeImages.py, A5) and the SQL variant (A3)
    features = property(lambda self: self.proc_dir / "features.npy")
    sql_db = property(lambda self: self.proc_dir / "image_similarity.sqlite")
    # Step 4 (4_trainSvm.py): skops payloads (ranker_files.save_payload)
    svm = property(lambda self: self.proc_dir / "svm.skops")
    classifier = property(lambda self: self.proc_dir / "classprob.skops")
    svm_curve = property(lambda self: self.results_dir / "svm_score_vs_probability.png")
    # Step 5 (5_evaluate.py)
    record = property(lambda self: self.proc_dir / "run.json")
    evaluation_json = property(lambda self: self.results_dir / "evaluation.json")
    evaluation_csv = property(lambda self: self.results_dir / "evaluation.csv")
    top_n_plot = property(lambda self: self.results_dir / "topN_accuracy.png")
    rank_histogram = property(lambda self: self.results_dir / "rank_histogram.png")
    ranking_results = property(lambda self: self.results_dir / "ranking_results.csv")
    # A6_findLabelIssues.py
    label_issues = property(lambda self: self.results_dir / "label_issues.csv")
    label_issues_sheet = property(lambda self: self.results_dir / "label_issues.png")
    # A7_embeddingMap.py: the map's points (for the web page) and its figure
    embedding_map = property(lambda self: self.proc_dir / "embedding_map.json")
    embedding_map_plot = property(lambda self: self.results_dir / "embedding_map.png")

    def visualizations(self, ranker):
        """Step 5's folder of per-query figures drawn with ``ranker``."""
        return self.results_dir / f"visualizations_{ranker}"

    def retrieval_figure(self, image_stem, ranker):
        """A1's figure of the matches of the query image named ``image_stem`` under ``ranker`` (its table: the same
        name with ``.csv``); a separator or another character a file name should not hold becomes '-'."""
        return self.results_dir / re.sub(r'[/\\:*?"<>|]', "-", f"retrieval_{image_stem}_{ranker}.png")

    def save_record(self, **facts):
        """Write what step 5 decided (e.g. ``best_on_val``) to ``run.json``, keeping the facts already there."""
        return save_json(self.record, {**self.load_record(), **facts})

    def load_record(self):
        """``run.json`` as a dict; {} before step 5 ran. A file that is not JSON is a ValueError naming it."""
        if not self.record.is_file():
            return {}
        record = load_json(self.record, "5_evaluate.py")
        if not isinstance(record, dict):
            raise ValueError(f"{self.record}: not a run record written by 5_evaluate.py: run it again")
        return record
