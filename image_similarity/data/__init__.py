"""Reading data: the one image reader, atomic files, downloads, splits and ranking sets, the feature store."""
