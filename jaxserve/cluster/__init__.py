"""Cluster scale-out: a batch file over Ray Data engine actors (`ray_data.py`, needs the
`jaxserve[ray]` extra) with results kept in a content-keyed block store (`block_store.py`)."""
