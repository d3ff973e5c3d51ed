"""Kernel wiring: links and addresses (pyroute2) and the firewall drivers."""
