"""Dagster wiring: assets, checks, sensors and the Definitions object. No algorithms live here."""
