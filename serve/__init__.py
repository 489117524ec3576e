"""Deployment runtime: every device its own process, talking MQTT through a real broker."""
