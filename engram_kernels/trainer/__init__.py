"""Streaming trainer: ingest documents, dream training examples, write them into memory layers."""
