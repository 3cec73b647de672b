"""Loading a finished run: the recommended ranker (hybrid whenever a classifier exists) and its fallbacks."""
from image_similarity.pipeline.runs import recommended_ranker


def test_recommended_ranker(tmp_path):
    csv_path = tmp_path / "evaluation.csv"
    assert recommended_ranker(csv_path, ["cosine", "L2"]) == "cosine"
    csv_path.write_text("ranker,top1,best_on_val\nL2,0.5,0\nweightedl2,0.7,1\n")
    assert recommended_ranker(csv_path, ["cosine", "L2", "weightedl2"]) == "weightedl2"
    assert recommended_ranker(csv_path, ["cosine", "L2"]) == "cosine"  # recommended one not available
    # With a classifier the hybrid ranker is the default, whatever step 5 marked best on validation.
    assert recommended_ranker(csv_path, ["cosine", "weightedl2", "classprob_same", "hybrid"]) == "hybrid"
    assert recommended_ranker(tmp_path / "missing.csv", ["cosine", "hybrid"]) == "hybrid"
