"""Branch operations that combine the store and the overlay engine (commit, discard)."""
