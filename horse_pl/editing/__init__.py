"""The editing pipeline: capture, residuals, spread, closed-form update, functional shifts."""
