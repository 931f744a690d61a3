"""Storage and bookkeeping: paths, atomic writes, content hashes, manifests, lineage, registry, remote stores."""
