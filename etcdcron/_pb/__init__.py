"""Generated protobuf modules (``make proto`` writes them from ``protos/``; never edit by hand)."""
