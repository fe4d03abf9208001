"""Incidents, work orders, crews, API and feedback (issue 7)."""
