"""Loading a finished run: the recommended ranker (hybrid whenever a classifier exists) and its fallbacks."""
from image_similarity.pipeline.layout import RunLayout
from image_similarity.pipeline.runs import recommended_ranker


def test_recommended_ranker(tmp_path):
    layout = RunLayout(tmp_path / "proc", tmp_path / "results")
    assert layout.load_record() == {}  # step 5 has not run
    assert recommended_ranker(layout.load_record(), ["cosine", "L2"]) == "cosine"
    layout.save_record(model_id="pretrained:x", best_on_val="weightedl2")
    record = layout.load_record()
    assert record == {"model_id": "pretrained:x", "best_on_val": "weightedl2"}
    assert recommended_ranker(record, ["cosine", "L2", "weightedl2"]) == "weightedl2"
    assert recommended_ranker(record, ["cosine", "L2"]) == "cosine"  # recommended one not available
    # With a classifier the hybrid ranker is the default, whatever step 5 marked best on validation.
    assert recommended_ranker(record, ["cosine", "weightedl2", "classprob_same", "hybrid"]) == "hybrid"
    assert recommended_ranker({}, ["cosine", "hybrid"]) == "hybrid"
