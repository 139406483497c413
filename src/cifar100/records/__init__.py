"""Run records (what a run showed, without its weights) and the tables made from them."""
