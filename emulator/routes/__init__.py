"""Route handlers, one module per plane; the route table is in `emulator.app`."""
