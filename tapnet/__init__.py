"""tapnet: Docker's container networking as a packet-level userspace router."""

__version__ = "0.1.0"
