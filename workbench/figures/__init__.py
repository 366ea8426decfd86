"""Plotly figures as pure functions of report data."""
