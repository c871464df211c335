"""Pretraining-data curation: normalisation, filtering and deduplication."""
