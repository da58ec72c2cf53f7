"""Lab code no device needs: the emulated test bed (``testbed``), the load generator and
real-cluster goodput bench (``loadgen``) and ``epara demo`` (``demo``). Firmware bundles
leave this package out (firmware_scripts/bundle.py)."""
