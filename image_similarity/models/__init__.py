"""Networks: the backbone registry (with each entry's data config), the embedder, inference engines, fine-tuning."""
