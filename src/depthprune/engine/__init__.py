"""Similarity search engine shared by SLM and LaCo."""
