"""Selection algorithms (engine-agnostic): the Selector interface, FTW and baselines."""
