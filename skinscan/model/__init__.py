"""What serving a model needs: the bundle format, preprocessing, inference backends, the scorer, the figures, the
bundle store and the registry. Training writes bundles with it (training/ imports it; it imports no training)."""
