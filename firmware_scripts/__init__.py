"""Put an epara node onto a device (Jetson, Raspberry Pi, server), offline, started at boot.

Installed as ``epara.firmware``: ``profiles`` (device profiles), ``bundle`` (build the
offline tarball), ``install`` (the stdlib-only installer inside every bundle), ``flash``
(mounted root or SSH), ``installed`` (run an installed node without booting the device),
``cli`` (``epara firmware``).
"""
