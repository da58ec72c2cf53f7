"""Lab code that no device needs: benchmarks and their reports (left out of what nodes
import; node/cli.py loads it only for the commands that use it)."""
