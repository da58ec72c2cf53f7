"""The leader's planning core (EPARA): categorise services, allocate parallel modes,
partition models into stages, schedule placements, route requests, and simulate it all.

Pure code: immutable values in, decisions out; no I/O, network or threads, so the node
and the simulator (``sim.py``) run exactly the same functions.
"""
