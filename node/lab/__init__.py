"""Lab code no device needs: the emulated test bed (``testbed``), the load generator and
real-cluster goodput bench (``loadgen``), ``epara demo`` (``demo``) and the simulator's
benchmark and reports (``goodput``). Firmware bundles leave this package out
(firmware_scripts/bundle.py); node/cli.py loads it only for the commands that use it."""
