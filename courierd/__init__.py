"""courierd: courier telemetry over MQTT to OneTablet delivery-status pushes."""

__version__ = "0.1.0"
