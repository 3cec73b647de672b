"""Loading a finished run: the recommended ranker and its one fallback."""
from image_similarity.runs import recommended_ranker


def test_recommended_ranker(tmp_path):
    csv_path = tmp_path / "evaluation.csv"
    assert recommended_ranker(csv_path, ["cosine", "L2"]) == "cosine"
    csv_path.write_text("ranker,top1,best_on_val\nL2,0.5,0\nweightedl2,0.7,1\n")
    assert recommended_ranker(csv_path, ["cosine", "L2", "weightedl2"]) == "weightedl2"
    assert recommended_ranker(csv_path, ["cosine", "L2"]) == "cosine"  # recommended one not available
