"""Search: distances, rankers, the nearest-neighbour index and the colour term."""
