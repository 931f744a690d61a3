"""One function per pipeline stage: read the previous stage's manifest, write files, a manifest and lineage.

Each is plain Python (usable from a notebook); the Dagster assets only wire resources and metadata to them.
"""
