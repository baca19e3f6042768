"""estimators package."""
