"""Training, evaluation and model bundles for SkinScan's lesion classifier."""
