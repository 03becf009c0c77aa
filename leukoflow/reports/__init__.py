"""Run reports and validation of recordings against labels."""
