"""Training data sets that need no download: generated or shipped inside a package."""
