"""The local server: its cluster (start, stop, status), state directory, binaries, the OS user
it runs as, the one renderer of its configuration, and `up`."""
